//! The REST API end to end against the in-process server and the mock teacher.

use std::time::Duration;

use distill_tests::harness::{table_counts, TestApp};
use distill_tests::mock_openai::MockOpenAi;
use reqwest::StatusCode;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn job_answers_every_prompt_and_records_everything() {
    let mock = MockOpenAi::start().await;
    let t = TestApp::start(&mock).await;
    let prompts: Vec<String> = (0..25).map(|i| format!("What is {i} + {i}?")).collect();
    let set = t.prompt_set("math", &prompts).await;
    let job = t
        .job(json!({"prompt_set": set, "teacher": "mock", "max_new_tokens": 64,
                    "template": "Solve step by step: {{ prompt }}", "system": "You are terse.",
                    "stop": ["\n\n"], "seed": 7}))
        .await;
    let v = t.wait_done(job, T).await;
    assert_eq!(v["counts"]["done"], 25, "{v}");
    assert_eq!(v["total"], 25);
    assert!(v["tokens_in"].as_i64().unwrap() > 0 && v["tokens_out"].as_i64().unwrap() > 0, "{v}");
    assert_eq!(v["eta_seconds"], 0.0);
    assert!(v["answers_per_second"].as_f64().unwrap() > 0.0);

    // Every decoding parameter is sent explicitly.
    for (_, body) in mock.received() {
        assert_eq!(body["temperature"], 0.0);
        assert_eq!(body["top_p"], 1.0);
        assert_eq!(body["seed"], 7);
        assert_eq!(body["max_tokens"], 64);
        assert_eq!(body["stop"], json!(["\n\n"]));
        assert_eq!(body["model"], "mock-model");
        assert_eq!(body["messages"][0], json!({"role": "system", "content": "You are terse."}));
    }
    let gens = t.all_generations(job, None).await;
    assert_eq!(gens.len(), 25);
    for g in &gens {
        let p = g["prompt"].as_str().unwrap();
        let rendered = format!("Solve step by step: {p}");
        assert_eq!(g["text"], MockOpenAi::answer_for(&rendered));
        assert_eq!(g["status"], "done");
        assert_eq!(g["finish_reason"], "stop");
        assert_eq!(g["model"], "mock-model");
        assert_eq!(g["system_fingerprint"], "fp_mock");
        assert_eq!(g["http_attempts"], 1);
        assert_eq!(g["attempts"], 1);
        assert!(g["latency_ms"].as_i64().is_some());
        assert!(g["prompt_tokens"].as_i64().unwrap() > 0);
        assert_eq!(g["request"][1]["content"], rendered);
    }
    // One generation by id equals its list entry.
    let (st, one) = t.get(&format!("/v1/generations/{}", gens[3]["id"])).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(one, gens[3]);
    // Keyset pagination: pages of 10 cover everything once.
    let (_, p1) = t.get(&format!("/v1/jobs/{job}/generations?limit=10")).await;
    let after = p1["next_after"].as_i64().unwrap();
    let (_, p2) = t.get(&format!("/v1/jobs/{job}/generations?limit=10&after={after}")).await;
    assert_eq!(p2["items"][0]["id"].as_i64().unwrap(), after + 1);
    let (_, failed) = t.get(&format!("/v1/jobs/{job}/generations?status=failed")).await;
    assert_eq!(failed["items"], json!([]));
    assert_eq!(failed["next_after"], Value::Null);
    let (_, jobs) = t.get("/v1/jobs").await;
    assert_eq!(jobs.as_array().unwrap().len(), 1);
    t.shutdown().await;
}

#[tokio::test]
async fn prompt_text_is_stored_and_returned_byte_exact() {
    let mock = MockOpenAi::start().await;
    let t = TestApp::start(&mock).await;
    let big: String = "Ω≈ç√∫ 🤖 ".repeat(200_000 / 12);
    let nasty = vec![
        "She said \"hi\" and 'bye' \\ backslash".to_string(),
        "'; DROP TABLE prompts; --".to_string(),
        "<script>alert(1)</script><b>bold</b>&amp;".to_string(),
        "emoji 👩‍👩‍👧‍👦 flags 🇺🇦 zero-width\u{200b}joiner".to_string(),
        "  leading and trailing spaces\n\n\ttabs\r\n".to_string(),
        "nul \u{0} inside".to_string(),
        big.clone(),
        "Кириллица и 中文 和 日本語".to_string(),
    ];
    let set = t.prompt_set("nasty", &nasty).await;
    let (_, page) = t.get(&format!("/v1/prompt-sets/{set}/prompts")).await;
    let stored: Vec<&str> = page["items"].as_array().unwrap().iter().map(|p| p["prompt"].as_str().unwrap()).collect();
    assert_eq!(stored, nasty.iter().map(String::as_str).collect::<Vec<_>>());
    let job = t.job(json!({"prompt_set": set, "teacher": "mock"})).await;
    t.wait_done(job, T).await;
    let gens = t.all_generations(job, None).await;
    for (g, p) in gens.iter().zip(&nasty) {
        assert_eq!(g["prompt"].as_str().unwrap(), p);
        assert_eq!(g["text"].as_str().unwrap(), MockOpenAi::answer_for(p));
    }
    assert!(mock.answered().contains_key(&big));
    t.shutdown().await;
}

#[tokio::test]
async fn identical_requests_are_answered_from_the_cache() {
    let mock = MockOpenAi::start().await;
    let t = TestApp::start(&mock).await;
    let prompts: Vec<String> = (0..10).map(|i| format!("q{i}")).collect();
    let set = t.prompt_set("a", &prompts).await;
    let job1 = t.job(json!({"prompt_set": set, "teacher": "mock", "max_new_tokens": 32})).await;
    t.wait_done(job1, T).await;
    let calls = mock.total_requests();
    assert_eq!(calls, 10);
    // Same prompts in another set and another job: no teacher call.
    let set2 = t.prompt_set("b", &prompts).await;
    let job2 = t.job(json!({"prompt_set": set2, "teacher": "mock", "max_new_tokens": 32})).await;
    let v = t.wait_done(job2, T).await;
    assert_eq!(mock.total_requests(), calls);
    assert_eq!(v["cache_hits"], 10, "{v}");
    assert_eq!(v["tokens_out"], t.get(&format!("/v1/jobs/{job1}")).await.1["tokens_out"]);
    for g in t.all_generations(job2, None).await {
        assert_eq!(g["cache_hit"], true);
        assert_eq!(g["text"], MockOpenAi::answer_for(g["prompt"].as_str().unwrap()));
    }
    // A different decoding parameter is a different request.
    let job3 = t.job(json!({"prompt_set": set2, "teacher": "mock", "max_new_tokens": 33})).await;
    let v = t.wait_done(job3, T).await;
    assert_eq!(v["cache_hits"], 0);
    assert_eq!(mock.total_requests(), calls + 10);
    t.shutdown().await;
}

#[tokio::test]
async fn completions_endpoint_and_messages_prompts() {
    let mock = MockOpenAi::start().await;
    let t = TestApp::start(&mock).await;
    let set = t.prompt_set("c", &["2+2=".to_string()]).await;
    let job = t.job(json!({"prompt_set": set, "teacher": "mock", "endpoint": "completions",
                           "template": "Q: {{ prompt }}\nA:"})).await;
    t.wait_done(job, T).await;
    let (_, body) = mock.received().last().unwrap().clone();
    assert_eq!(body["prompt"], "Q: 2+2=\nA:");
    assert!(body.get("messages").is_none());
    let g = &t.all_generations(job, None).await[0];
    assert_eq!(g["text"], MockOpenAi::answer_for("Q: 2+2=\nA:"));

    let (st, v) = t
        .post_json("/v1/prompt-sets", json!({"name": "m", "prompts": [
            {"id": "conv-1", "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}],
             "metadata": {"source": "test", "n": 1}}]}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let job = t.job(json!({"prompt_set": v["id"], "teacher": "mock", "template": "[{{ metadata.source }}] {{ prompt }}"})).await;
    t.wait_done(job, T).await;
    let (_, body) = mock.received().last().unwrap().clone();
    assert_eq!(body["messages"].as_array().unwrap().len(), 4);
    assert_eq!(body["messages"][3]["content"], "[test] bye");
    // Messages prompts cannot go to the completions endpoint.
    let (st, e) = t.post_json("/v1/jobs", json!({"prompt_set": v["id"], "teacher": "mock", "endpoint": "completions"})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["field"], "endpoint");
    t.shutdown().await;
}

#[tokio::test]
async fn pause_resume_cancel_and_delete_rules() {
    let mock = MockOpenAi::start().await;
    mock.set_latency(Duration::from_millis(100));
    let t = TestApp::start(&mock).await;
    let prompts: Vec<String> = (0..60).map(|i| format!("p{i}")).collect();
    let set = t.prompt_set("s", &prompts).await;
    let job = t.job(json!({"prompt_set": set, "teacher": "mock"})).await;
    t.wait_job(job, T, |v| v["counts"]["done"].as_i64().unwrap() >= 8).await;
    let (st, v) = t.post(&format!("/v1/jobs/{job}/pause")).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "paused");
    // In-flight requests finish; then nothing moves.
    let settled = t.wait_job(job, T, |v| v["counts"]["running"] == 0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still = t.get(&format!("/v1/jobs/{job}")).await.1;
    assert_eq!(still["counts"]["done"], settled["counts"]["done"]);
    assert!(still["counts"]["queued"].as_i64().unwrap() > 0);
    // Deleting the set is refused while the job is active, and nothing is deleted.
    let before = table_counts(&t.db_path).await;
    let (st, e) = t.delete(&format!("/v1/prompt-sets/{set}")).await;
    assert_eq!(st, StatusCode::CONFLICT, "{e}");
    assert_eq!(table_counts(&t.db_path).await, before);
    let (st, _) = t.post(&format!("/v1/jobs/{job}/pause")).await;
    assert_eq!(st, StatusCode::CONFLICT);
    let (st, v) = t.post(&format!("/v1/jobs/{job}/resume")).await;
    assert_eq!((st, v["status"].as_str()), (StatusCode::OK, Some("running")));
    t.wait_job(job, T, |v| v["counts"]["done"].as_i64().unwrap() >= still["counts"]["done"].as_i64().unwrap() + 8).await;
    let (st, v) = t.post(&format!("/v1/jobs/{job}/cancel")).await;
    assert_eq!((st, v["status"].as_str()), (StatusCode::OK, Some("cancelled")));
    let v = t.wait_job(job, T, |v| v["counts"]["running"] == 0).await;
    assert!(v["counts"]["cancelled"].as_i64().unwrap() > 0);
    let done = v["counts"]["done"].as_i64().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(t.get(&format!("/v1/jobs/{job}")).await.1["counts"]["done"].as_i64().unwrap(), done);
    // Finished jobs: delete needs ?with_jobs=true.
    let (st, _) = t.delete(&format!("/v1/prompt-sets/{set}")).await;
    assert_eq!(st, StatusCode::CONFLICT);
    let (st, _) = t.delete(&format!("/v1/prompt-sets/{set}?with_jobs=true")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_eq!(t.get(&format!("/v1/jobs/{job}")).await.0, StatusCode::NOT_FOUND);
    assert_eq!(t.get(&format!("/v1/prompt-sets/{set}")).await.0, StatusCode::NOT_FOUND);
    t.shutdown().await;
}

#[tokio::test]
async fn health_metrics_teachers_openapi() {
    let mock = MockOpenAi::start().await;
    let t = TestApp::start(&mock).await;
    let (st, h) = t.get("/health").await;
    assert_eq!((st, h["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (_, teachers) = t.get("/v1/teachers").await;
    assert_eq!(teachers[0]["name"], "mock");
    assert_eq!(teachers[0]["error"], Value::Null);
    let set = t.prompt_set("m", &["x".to_string()]).await;
    let job = t.job(json!({"prompt_set": set, "teacher": "mock"})).await;
    t.wait_done(job, T).await;
    let (st, body) = t.get_bytes("/metrics").await;
    assert_eq!(st, StatusCode::OK);
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(text.contains("distill_generations_total{teacher=\"mock\",outcome=\"Done\"}"), "{text}");
    let (st, spec) = t.get("/openapi.json").await;
    assert_eq!(st, StatusCode::OK);
    assert!(spec["paths"]["/v1/jobs/{id}/export"].is_object());
    t.shutdown().await;
}
