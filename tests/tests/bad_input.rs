//! Malformed and invalid requests: a 4xx JSON error naming the field, and the database unchanged.

use distill_tests::harness::{table_counts, TestApp};
use distill_tests::mock_openai::MockOpenAi;
use reqwest::StatusCode;
use serde_json::{json, Value};

fn expect_error(status: StatusCode, body: &Value, want: StatusCode, field: Option<&str>, case: &str) {
    assert_eq!(status, want, "{case}: {body}");
    let err = &body["error"];
    assert!(err["code"].is_string() && err["message"].is_string(), "{case}: {body}");
    if let Some(f) = field {
        assert_eq!(err["field"], f, "{case}: {body}");
    }
}

#[tokio::test]
async fn every_bad_request_is_refused_with_the_field_and_changes_nothing() {
    let mock = MockOpenAi::start().await;
    let t = TestApp::start_with(|s| {
        distill_tests::harness::with_mock(s, &mock);
        s.body_limit = 1 << 20;
    })
    .await;
    let set = t.prompt_set("ok", &["fine".to_string()]).await;
    let before = table_counts(&t.db_path).await;
    let bad = StatusCode::BAD_REQUEST;

    let json_cases: Vec<(&str, Value, &str)> = vec![
        ("empty prompt set", json!({"name": "x", "prompts": []}), "prompts"),
        ("missing name", json!({"prompts": [{"prompt": "a"}]}), "name"),
        ("empty name", json!({"name": "", "prompts": [{"prompt": "a"}]}), "name"),
        ("name wrong type", json!({"name": 5, "prompts": [{"prompt": "a"}]}), "name"),
        ("unknown field", json!({"name": "x", "prompts": [{"prompt": "a"}], "extra": 1}), "extra"),
        ("unknown nested field", json!({"name": "x", "prompts": [{"prompt": "a", "promt": "b"}]}), "prompts[0].promt"),
        ("prompt wrong type", json!({"name": "x", "prompts": [{"prompt": 3}]}), "prompts[0].prompt"),
        ("prompt and messages", json!({"name": "x", "prompts": [{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}]}), "prompts[0]"),
        ("neither", json!({"name": "x", "prompts": [{"prompt": "a"}, {"system": "s"}]}), "prompts[1].prompt"),
        ("empty prompt", json!({"name": "x", "prompts": [{"prompt": ""}]}), "prompts[0].prompt"),
        ("bad role", json!({"name": "x", "prompts": [{"messages": [{"role": "robot", "content": "b"}]}]}), "prompts[0].messages[0].role"),
        ("answer without a question", json!({"name": "x", "prompts": [{"messages": [{"role": "system", "content": "a"}, {"role": "assistant", "content": "b"}]}]}), "prompts[0].messages[1].role"),
        ("metadata not object", json!({"name": "x", "prompts": [{"prompt": "a", "metadata": [1]}]}), "prompts[0].metadata"),
        ("id wrong type", json!({"name": "x", "prompts": [{"prompt": "a", "id": [1]}]}), "prompts[0].id"),
    ];
    for (case, body, field) in json_cases {
        let (st, v) = t.post_json("/v1/prompt-sets", body).await;
        expect_error(st, &v, bad, Some(field), case);
    }

    let job_cases: Vec<(&str, Value, &str)> = vec![
        ("unknown teacher", json!({"prompt_set": set, "teacher": "nope"}), "teacher"),
        ("unknown prompt set", json!({"prompt_set": 999, "teacher": "mock"}), "prompt_set"),
        ("negative max tokens", json!({"prompt_set": set, "teacher": "mock", "max_new_tokens": -1}), "max_new_tokens"),
        ("zero max tokens", json!({"prompt_set": set, "teacher": "mock", "max_new_tokens": 0}), "max_new_tokens"),
        ("absurd max tokens", json!({"prompt_set": set, "teacher": "mock", "max_new_tokens": 1_000_000_000_000i64}), "max_new_tokens"),
        ("fractional max tokens", json!({"prompt_set": set, "teacher": "mock", "max_new_tokens": 1.5}), "max_new_tokens"),
        ("negative seed", json!({"prompt_set": set, "teacher": "mock", "seed": -3}), "seed"),
        ("stop not list", json!({"prompt_set": set, "teacher": "mock", "stop": "x"}), "stop"),
        ("empty stop", json!({"prompt_set": set, "teacher": "mock", "stop": ["a", ""]}), "stop[1]"),
        ("too many stops", json!({"prompt_set": set, "teacher": "mock", "stop": vec!["s"; 17]}), "stop"),
        ("template syntax", json!({"prompt_set": set, "teacher": "mock", "template": "{% if %}"}), "template"),
        ("template without prompt", json!({"prompt_set": set, "teacher": "mock", "template": "hello"}), "template"),
        ("template undefined var", json!({"prompt_set": set, "teacher": "mock", "template": "{{ prompt }} {{ metadata.nope }}"}), "template"),
        ("bad endpoint", json!({"prompt_set": set, "teacher": "mock", "endpoint": "embeddings"}), "endpoint"),
        ("unknown job field", json!({"prompt_set": set, "teacher": "mock", "temperature": 0.7}), "temperature"),
        ("prompt_set wrong type", json!({"prompt_set": "one", "teacher": "mock"}), "prompt_set"),
        ("too many logprobs", json!({"prompt_set": set, "teacher": "mock", "logprobs": 1000}), "logprobs"),
        ("fractional logprobs", json!({"prompt_set": set, "teacher": "mock", "logprobs": 2.5}), "logprobs"),
        ("unknown mode", json!({"prompt_set": set, "teacher": "mock", "mode": "score"}), "mode"),
        ("rescore without logprobs", json!({"prompt_set": set, "teacher": "mock", "mode": "rescore"}), "logprobs"),
    ];
    for (case, body, field) in job_cases {
        let (st, v) = t.post_json("/v1/jobs", body).await;
        expect_error(st, &v, bad, Some(field), case);
    }

    let raw_cases: Vec<(&str, &str, &str, Vec<u8>, StatusCode, Option<&str>)> = vec![
        ("broken JSON", "/v1/prompt-sets", "application/json", b"{\"name\": \"x\", \"prompts\": [".to_vec(), bad, Some("body")),
        ("trailing garbage", "/v1/prompt-sets", "application/json", b"{\"name\": \"x\", \"prompts\": [{\"prompt\": \"a\"}]} {}".to_vec(), bad, Some("body")),
        ("empty body", "/v1/prompt-sets", "application/json", Vec::new(), bad, Some("body")),
        ("invalid UTF-8 in JSON", "/v1/prompt-sets", "application/json", b"{\"name\": \"x\", \"prompts\": [{\"prompt\": \"\xff\xfe\"}]}".to_vec(), bad, None),
        ("invalid UTF-8 in JSONL", "/v1/prompt-sets?format=jsonl", "application/octet-stream", b"{\"prompt\": \"ok\"}\n{\"prompt\": \"\xc3\x28\"}\n".to_vec(), bad, Some("line 2")),
        ("JSONL line not object", "/v1/prompt-sets", "application/x-ndjson", b"{\"prompt\": \"ok\"}\n[1,2]\n".to_vec(), bad, Some("line 2")),
        ("JSONL wrong column", "/v1/prompt-sets?column=question", "application/x-ndjson", b"{\"prompt\": \"ok\"}\n".to_vec(), bad, Some("line 1.question")),
        ("empty JSONL", "/v1/prompt-sets", "application/x-ndjson", b"\n\n".to_vec(), bad, Some("body")),
        ("CSV without column", "/v1/prompt-sets", "text/csv", b"question\nwhat\n".to_vec(), bad, Some("column")),
        ("CSV ragged", "/v1/prompt-sets", "text/csv", b"prompt,b\nx,1\ny\n".to_vec(), bad, Some("line 3")),
        ("not parquet", "/v1/prompt-sets?format=parquet", "application/octet-stream", b"PAR1 not really".to_vec(), bad, Some("body")),
        ("unsupported type", "/v1/prompt-sets", "text/plain", b"hello".to_vec(), StatusCode::UNSUPPORTED_MEDIA_TYPE, Some("Content-Type")),
        ("job as text", "/v1/jobs", "text/plain", b"{}".to_vec(), StatusCode::UNSUPPORTED_MEDIA_TYPE, Some("Content-Type")),
        ("too large", "/v1/prompt-sets", "application/json", {
            let big = "x".repeat(2 << 20);
            serde_json::to_vec(&json!({"name": "big", "prompts": [{"prompt": big}]})).unwrap()
        }, StatusCode::PAYLOAD_TOO_LARGE, Some("body")),
        ("too large upload", "/v1/prompt-sets", "application/x-ndjson", vec![b'{'; 3 << 20], StatusCode::PAYLOAD_TOO_LARGE, Some("body")),
    ];
    for (case, path, ct, body, want, field) in raw_cases {
        let (st, v) = t.post_raw(path, ct, body).await;
        expect_error(st, &v, want, field, case);
    }

    let get_cases: Vec<(&str, StatusCode, Option<&str>)> = vec![
        ("/v1/jobs/12345", StatusCode::NOT_FOUND, None),
        ("/v1/jobs/abc", bad, Some("id")),
        ("/v1/jobs/-1", bad, Some("id")),
        ("/v1/prompt-sets/777", StatusCode::NOT_FOUND, None),
        ("/v1/generations/999", StatusCode::NOT_FOUND, None),
        ("/v1/jobs/1/generations", StatusCode::NOT_FOUND, None),
        ("/v1/prompt-sets/1/prompts?limit=0", bad, Some("limit")),
        ("/v1/prompt-sets/1/prompts?limit=abc", bad, Some("limit")),
        ("/v1/prompt-sets/1/prompts?colour=red", bad, Some("colour")),
        ("/v1/jobs/1/export?format=xml", bad, Some("format")),
        ("/v1/nothing-here", StatusCode::NOT_FOUND, None),
    ];
    for (path, want, field) in get_cases {
        let (st, v) = t.get(path).await;
        expect_error(st, &v, want, field, path);
    }
    for path in ["/v1/jobs/999/pause", "/v1/jobs/999/resume", "/v1/jobs/999/cancel", "/v1/jobs/999/retry-failed"] {
        let (st, v) = t.post(path).await;
        expect_error(st, &v, StatusCode::NOT_FOUND, None, path);
    }
    let (st, v) = t.delete("/v1/prompt-sets/4242").await;
    expect_error(st, &v, StatusCode::NOT_FOUND, None, "delete unknown");

    assert_eq!(table_counts(&t.db_path).await, before, "a rejected request changed the database");
    t.shutdown().await;
}

#[tokio::test]
async fn api_token_is_required_when_set() {
    let mock = MockOpenAi::start().await;
    let t = TestApp::start_with(|s| {
        distill_tests::harness::with_mock(s, &mock);
        s.api_token = Some("s3cret".into());
    })
    .await;
    let (st, v) = t.get("/v1/jobs").await;
    expect_error(st, &v, StatusCode::UNAUTHORIZED, Some("Authorization"), "no token");
    let (st, _) = t.get("/metrics").await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let r = t.client.get(format!("{}/v1/jobs", t.url)).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = t.client.get(format!("{}/v1/jobs", t.url)).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(t.get("/health").await.0, StatusCode::OK, "health stays open for probes");
    t.shutdown().await;
}
