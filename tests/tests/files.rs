//! Uploads (JSONL, CSV, Parquet; raw bodies and multipart) and exports (JSONL, Parquet).

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, AsArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use distill_tests::harness::TestApp;
use distill_tests::mock_openai::MockOpenAi;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use reqwest::StatusCode;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

fn parquet_bytes() -> Vec<u8> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("problem", DataType::Utf8, false),
        Field::new("level", DataType::Int64, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from(vec![10, 11, 12])),
            Arc::new(StringArray::from(vec!["pq one", "pq two", "pq three"])),
            Arc::new(Int64Array::from(vec![Some(1), None, Some(3)])),
        ],
    )
    .unwrap();
    let mut out = Vec::new();
    let mut w = ArrowWriter::try_new(&mut out, schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    out
}

#[tokio::test]
async fn uploads_in_every_format() {
    let mock = MockOpenAi::start().await;
    let t = TestApp::start(&mock).await;

    let (st, v) = t
        .post_raw("/v1/prompt-sets?name=jl&column=question", "application/x-ndjson",
                  "{\"question\": \"a?\", \"id\": \"q1\", \"topic\": \"x\"}\n{\"question\": \"b?\"}\n")
        .await;
    assert_eq!((st, v["count"].as_i64()), (StatusCode::CREATED, Some(2)), "{v}");
    let (_, page) = t.get(&format!("/v1/prompt-sets/{}/prompts", v["id"])).await;
    assert_eq!(page["items"][0]["prompt"], "a?");
    assert_eq!(page["items"][0]["external_id"], "q1");
    assert_eq!(page["items"][0]["metadata"], json!({"topic": "x"}));

    let (st, v) = t.post_raw("/v1/prompt-sets?name=c", "text/csv", "id,prompt,system\n1,\"x, \"\"y\"\"\",be kind\n2,z,\n").await;
    assert_eq!((st, v["count"].as_i64()), (StatusCode::CREATED, Some(2)), "{v}");
    let (_, page) = t.get(&format!("/v1/prompt-sets/{}/prompts", v["id"])).await;
    assert_eq!(page["items"][0]["prompt"], "x, \"y\"");
    assert_eq!(page["items"][0]["system"], "be kind");
    assert_eq!(page["items"][1]["system"], Value::Null);

    let (st, v) = t.post_raw("/v1/prompt-sets?name=p&column=problem", "application/vnd.apache.parquet", parquet_bytes()).await;
    assert_eq!((st, v["count"].as_i64()), (StatusCode::CREATED, Some(3)), "{v}");
    let (_, page) = t.get(&format!("/v1/prompt-sets/{}/prompts", v["id"])).await;
    assert_eq!(page["items"][2]["prompt"], "pq three");
    assert_eq!(page["items"][2]["external_id"], "12");
    assert_eq!(page["items"][0]["metadata"], json!({"level": 1}));

    // Multipart, as a browser form sends it; the format comes from the file name.
    let form = reqwest::multipart::Form::new()
        .text("name", "form upload")
        .part("file", reqwest::multipart::Part::bytes(parquet_bytes()).file_name("set.parquet"));
    let r = t.client.post(format!("{}/v1/prompt-sets?column=problem", t.url)).multipart(form).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: Value = r.json().await.unwrap();
    let (_, detail) = t.get(&format!("/v1/prompt-sets/{}", v["id"])).await;
    assert_eq!(detail["name"], "form upload");
    assert_eq!(detail["source"], "parquet");
    assert_eq!(detail["count"], 3);
    let (_, all) = t.get("/v1/prompt-sets").await;
    assert_eq!(all.as_array().unwrap().len(), 4);
    t.shutdown().await;
}

#[tokio::test]
async fn exports_are_ready_for_trl_and_open_r1() {
    let mock = MockOpenAi::start().await;
    let t = TestApp::start(&mock).await;
    let (_, v) = t
        .post_json("/v1/prompt-sets", json!({"name": "e", "prompts": [
            {"prompt": "What is 2+2?", "id": "a", "metadata": {"answer": 4}},
            {"prompt": "Name a colour.", "id": "b"}]}))
        .await;
    let job = t.job(json!({"prompt_set": v["id"], "teacher": "mock", "system": "sys",
                           "template": "Think, then answer: {{ prompt }}"})).await;
    t.wait_done(job, T).await;

    let (st, body) = t.get_bytes(&format!("/v1/jobs/{job}/export?format=jsonl")).await;
    assert_eq!(st, StatusCode::OK);
    let rows: Vec<Value> = std::str::from_utf8(&body).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    let r = &rows[0];
    let answer = MockOpenAi::answer_for("Think, then answer: What is 2+2?");
    assert_eq!(r["messages"], json!([
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "Think, then answer: What is 2+2?"},
        {"role": "assistant", "content": answer}]));
    assert_eq!(r["prompt"], json!([{"role": "system", "content": "sys"}, {"role": "user", "content": "Think, then answer: What is 2+2?"}]));
    assert_eq!(r["completion"], json!([{"role": "assistant", "content": answer}]));
    assert_eq!(r["problem"], "What is 2+2?");
    assert_eq!(r["generation"], answer);
    assert_eq!(r["external_id"], "a");
    assert_eq!(r["metadata"], json!({"answer": 4}));
    assert_eq!(r["finish_reason"], "stop");
    assert_eq!(r["teacher"], "mock");

    let (st, body) = t.get_bytes(&format!("/v1/jobs/{job}/export?format=parquet")).await;
    assert_eq!(st, StatusCode::OK);
    let reader = ParquetRecordBatchReaderBuilder::try_new(body).unwrap().build().unwrap();
    let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
    let b = &batches[0];
    assert_eq!(b.num_rows(), 2);
    let generation = b.column_by_name("generation").unwrap().as_string::<i32>();
    assert_eq!(generation.value(0), answer);
    let problem = b.column_by_name("problem").unwrap().as_string::<i32>();
    assert_eq!(problem.value(1), "Name a colour.");
    let messages = b.column_by_name("messages").unwrap().as_list::<i32>();
    let first = messages.value(0);
    let first = first.as_struct();
    assert_eq!(first.len(), 3);
    assert_eq!(first.column_by_name("role").unwrap().as_string::<i32>().value(2), "assistant");
    assert_eq!(first.column_by_name("content").unwrap().as_string::<i32>().value(2), answer);
    let completion = b.column_by_name("completion").unwrap().as_list::<i32>();
    assert_eq!(completion.value(1).as_struct().len(), 1);

    // A completions-endpoint job exports prompt/completion as strings.
    let (_, v) = t.post_json("/v1/prompt-sets", json!({"name": "raw", "prompts": [{"prompt": "1, 2, 3,"}]})).await;
    let job = t.job(json!({"prompt_set": v["id"], "teacher": "mock", "endpoint": "completions"})).await;
    t.wait_done(job, T).await;
    let (_, body) = t.get_bytes(&format!("/v1/jobs/{job}/export")).await;
    let row: Value = serde_json::from_slice(body.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(row["prompt"], "1, 2, 3,");
    assert_eq!(row["completion"], MockOpenAi::answer_for("1, 2, 3,"));
    let (_, body) = t.get_bytes(&format!("/v1/jobs/{job}/export?format=parquet")).await;
    let b = ParquetRecordBatchReaderBuilder::try_new(body).unwrap().build().unwrap().next().unwrap().unwrap();
    assert_eq!(b.column_by_name("prompt").unwrap().as_string::<i32>().value(0), "1, 2, 3,");
    t.shutdown().await;
}

#[tokio::test]
async fn export_pages_through_large_jobs() {
    let mock = MockOpenAi::start().await;
    let t = TestApp::start(&mock).await;
    let prompts: Vec<String> = (0..2500).map(|i| format!("bulk {i}")).collect();
    let set = t.prompt_set("bulk", &prompts).await;
    let job = t.job(json!({"prompt_set": set, "teacher": "mock"})).await;
    t.wait_done(job, Duration::from_secs(120)).await;
    let (_, body) = t.get_bytes(&format!("/v1/jobs/{job}/export")).await;
    let lines: Vec<Value> = std::str::from_utf8(&body).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2500);
    let mut seen: Vec<&str> = lines.iter().map(|l| l["problem"].as_str().unwrap()).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 2500);
    t.shutdown().await;
}
