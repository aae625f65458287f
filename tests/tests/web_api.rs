//! The REST pieces the web UI is built on, against the in-process server and the mock teacher:
//! text search, job preview, live job events, throughput, failures by reason, and the embedded
//! page itself. (The page in a real browser: `web_ui.rs`.)

use std::collections::BTreeSet;
use std::time::Duration;

use distill_tests::harness::{table_counts, TestApp};
use distill_tests::mock_openai::{Fault, MockOpenAi};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

/// Ids of every generation matching `q` (following pagination with small pages).
async fn search(t: &TestApp, job: i64, q: &str, extra: &str) -> Vec<i64> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let path = format!(
            "/v1/jobs/{job}/generations?q={}&limit=7&after={after}{extra}",
            form_urlencoded(q)
        );
        let (st, v) = t.get(&path).await;
        assert_eq!(st, StatusCode::OK, "{path}: {v}");
        out.extend(v["items"].as_array().unwrap().iter().map(|g| g["id"].as_i64().unwrap()));
        match v["next_after"].as_i64() {
            Some(n) => after = n,
            None => return out,
        }
    }
}

fn form_urlencoded(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn search_finds_words_in_prompts_and_answers_and_pages() {
    let mock = MockOpenAi::start().await;
    let t = TestApp::start(&mock).await;
    let mut prompts: Vec<String> = (0..120).map(|i| format!("filler number {i}")).collect();
    prompts.push("Explain photosynthesis briefly".into());
    prompts.push("<script>window.__pwned=1</script> tell a joke".into());
    prompts.push("Un café au lait, s'il vous plaît".into());
    let set = t.prompt_set("mixed", &prompts).await;
    let job = t.job(json!({"prompt_set": set, "teacher": "mock", "max_new_tokens": 16})).await;
    t.wait_done(job, T).await;
    let gens = t.all_generations(job, None).await;
    let id_of = |prompt: &str| gens.iter().find(|g| g["prompt"] == prompt).unwrap()["id"].as_i64().unwrap();

    // A prefix of a prompt word; case-insensitive.
    assert_eq!(search(&t, job, "PHOTO", "").await, vec![id_of("Explain photosynthesis briefly")]);
    // Markup is searched as words, never as a query language.
    let script = id_of("<script>window.__pwned=1</script> tell a joke");
    assert_eq!(search(&t, job, "<script>", "").await, vec![script]);
    assert_eq!(search(&t, job, "window.__pwned", "").await, vec![script]);
    // Accents do not matter.
    assert_eq!(search(&t, job, "cafe PLAIT", "").await, vec![id_of("Un café au lait, s'il vous plaît")]);
    // "echo" is only in answers ("echo: filler number 7"): every word must match one side,
    // numbers are prefixes too (7, 70..79).
    let want: Vec<i64> = std::iter::once(7).chain(70..80).map(|i| id_of(&format!("filler number {i}"))).collect();
    assert_eq!(search(&t, job, "echo filler 7", "").await, want);
    // Pages of 7 chain through all 120 matches without repeats, in id order.
    let all = search(&t, job, "filler", "").await;
    assert_eq!(all.len(), 120);
    assert!(all.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(all.iter().collect::<BTreeSet<_>>().len(), 120);
    // Search and status filter combine.
    assert_eq!(search(&t, job, "filler", "&status=done").await.len(), 120);
    assert!(search(&t, job, "filler", "&status=failed").await.is_empty());
    assert!(search(&t, job, "nosuchword", "").await.is_empty());

    // Conversation prompts are searched by their messages' content, not their JSON keys.
    let (st, v) = t
        .post_json(
            "/v1/prompt-sets",
            json!({"name": "conv", "prompts": [
                {"messages": [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "an answer"},
                              {"role": "user", "content": "zebra follow-up"}]},
                {"prompt": "plain", "system": "speak like a pirate"}]}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let job2 = t.job(json!({"prompt_set": v["id"], "teacher": "mock"})).await;
    t.wait_done(job2, T).await;
    assert_eq!(search(&t, job2, "zebra", "").await.len(), 1);
    assert_eq!(search(&t, job2, "pirate", "").await.len(), 1, "system prompts are searched");
    assert!(search(&t, job2, "role", "").await.is_empty(), "JSON keys are not text");
    assert!(search(&t, job, "zebra", "").await.is_empty(), "a search stays within its job");

    for bad in ["", "%3C%3E", &"a+".repeat(17)] {
        let (st, v) = t.get(&format!("/v1/jobs/{job}/generations?q={bad}")).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "q={bad}: {v}");
        assert_eq!(v["error"]["field"], "q", "{v}");
    }
}

#[tokio::test]
async fn preview_renders_the_first_prompts_without_storing_anything() {
    let mock = MockOpenAi::start().await;
    let t = TestApp::start(&mock).await;
    let prompts: Vec<String> = (0..10).map(|i| format!("question {i}")).collect();
    let set = t.prompt_set("p", &prompts).await;
    let before = table_counts(&t.db_path).await;
    let (st, v) = t
        .post_json(
            "/v1/jobs/preview",
            json!({"prompt_set": set, "teacher": "mock", "template": "Q: {{ prompt }}", "system": "Be brief."}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["count"], 10);
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[1]["position"], 1);
    assert_eq!(
        items[1]["request"],
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: question 1"}])
    );
    let (st, v) = t
        .post_json("/v1/jobs/preview?limit=2", json!({"prompt_set": set, "teacher": "mock", "endpoint": "completions",
                                                     "template": "<s>{{ prompt }}\n"}))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["items"].as_array().unwrap().len(), 2);
    assert_eq!(v["items"][0]["request"], "<s>question 0\n");
    for (path, body, field) in [
        ("/v1/jobs/preview", json!({"prompt_set": set, "teacher": "mock", "template": "{{ prompt "}), "template"),
        ("/v1/jobs/preview", json!({"prompt_set": set, "teacher": "nope"}), "teacher"),
        ("/v1/jobs/preview", json!({"prompt_set": 999, "teacher": "mock"}), "prompt_set"),
        ("/v1/jobs/preview?limit=0", json!({"prompt_set": set, "teacher": "mock"}), "limit"),
        ("/v1/jobs/preview", json!({"prompt_set": set, "teacher": "mock", "max_new_tokens": 0}), "max_new_tokens"),
    ] {
        let (st, v) = t.post_json(path, body).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{path}: {v}");
        assert_eq!(v["error"]["field"], field, "{v}");
    }
    assert_eq!(table_counts(&t.db_path).await, before, "a preview stores nothing");
}

/// Reads `event: job` messages off an SSE response until `pred` holds for one.
async fn next_event(
    stream: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    buf: &mut String,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        while let Some(end) = buf.find("\n\n") {
            let msg: String = buf.drain(..end + 2).collect();
            let mut event = None;
            let mut data = String::new();
            for line in msg.lines() {
                if let Some(e) = line.strip_prefix("event:") {
                    event = Some(e.trim().to_string());
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim_start());
                }
            }
            if event.as_deref() == Some("job") {
                let v: Value = serde_json::from_str(&data).unwrap();
                if pred(&v) {
                    return v;
                }
            }
        }
        let chunk = tokio::time::timeout_at(deadline, stream.next()).await.expect("event in time").expect("stream open");
        buf.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
}

#[tokio::test]
async fn job_events_throughput_and_failures() {
    let mock = MockOpenAi::start().await;
    mock.set_latency(Duration::from_millis(150));
    let t = TestApp::start(&mock).await;
    let prompts: Vec<String> = (0..40).map(|i| format!("item {i}")).collect();
    let set = t.prompt_set("ev", &prompts).await;
    // Three requests are refused (400, not retried): three failed items with one reason.
    mock.push_faults([Fault::BadRequest, Fault::BadRequest, Fault::BadRequest]);
    let job = t.job(json!({"prompt_set": set, "teacher": "mock", "max_new_tokens": 8})).await;

    let resp = t.client.get(format!("{}/v1/jobs/{job}/events", t.url)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    assert_eq!(resp.headers()["x-accel-buffering"], "no");
    assert_eq!(resp.headers()["cache-control"], "no-cache");
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let first = next_event(&mut stream, &mut buf, |_| true).await;
    assert_eq!(first["id"], job);
    // Live: the stream reports progress, then the pause, without being asked again.
    next_event(&mut stream, &mut buf, |v| v["counts"]["done"].as_i64().unwrap() > 0).await;
    let (st, _) = t.post(&format!("/v1/jobs/{job}/pause")).await;
    assert_eq!(st, StatusCode::OK);
    let paused = next_event(&mut stream, &mut buf, |v| v["status"] == "paused").await;
    assert!(paused["counts"]["queued"].as_i64().unwrap() > 0, "{paused}");
    t.post(&format!("/v1/jobs/{job}/resume")).await;
    let done = next_event(&mut stream, &mut buf, |v| v["status"] == "done").await;
    assert_eq!(done["counts"]["failed"], 3, "{done}");
    assert_eq!(done["counts"]["done"], 37, "{done}");
    assert!(done["tokens_per_second"].as_f64().unwrap() > 0.0, "{done}");

    let (st, f) = t.get(&format!("/v1/jobs/{job}/failures")).await;
    assert_eq!(st, StatusCode::OK, "{f}");
    assert_eq!(f["total"], 3);
    let reasons = f["reasons"].as_array().unwrap();
    assert_eq!(reasons.len(), 1, "{f}");
    assert_eq!(reasons[0]["count"], 3);
    let example = reasons[0]["example"].as_i64().unwrap();
    let (_, g) = t.get(&format!("/v1/generations/{example}")).await;
    assert_eq!(g["status"], "failed");
    assert_eq!(g["last_error"], reasons[0]["reason"]);

    let (st, th) = t.get(&format!("/v1/jobs/{job}/throughput?buckets=20")).await;
    assert_eq!(st, StatusCode::OK, "{th}");
    let buckets = th["buckets"].as_array().unwrap();
    assert!(!buckets.is_empty() && buckets.len() <= 20, "{th}");
    let sum = |k: &str| buckets.iter().map(|b| b[k].as_i64().unwrap()).sum::<i64>();
    assert_eq!(sum("answers"), 37);
    assert_eq!(sum("tokens"), done["tokens_out"].as_i64().unwrap());
    let width = th["bucket_ms"].as_i64().unwrap();
    assert!(width >= 1000);
    assert!(buckets.windows(2).all(|w| w[1]["start"].as_i64().unwrap() - w[0]["start"].as_i64().unwrap() == width));
    assert_eq!(buckets[0]["start"], done["started_at"]);

    // Retrying the failures empties the groups.
    t.post(&format!("/v1/jobs/{job}/retry-failed")).await;
    next_event(&mut stream, &mut buf, |v| v["status"] == "done" && v["counts"]["done"] == 40).await;
    let (_, f) = t.get(&format!("/v1/jobs/{job}/failures")).await;
    assert_eq!(f, json!({"total": 0, "reasons": []}));

    for path in [format!("/v1/jobs/{job}/throughput?buckets=0"), format!("/v1/jobs/{job}/throughput?buckets=501")] {
        let (st, v) = t.get(&path).await;
        assert_eq!((st, v["error"]["field"].clone()), (StatusCode::BAD_REQUEST, json!("buckets")), "{v}");
    }
    for path in ["/v1/jobs/999/events", "/v1/jobs/999/throughput", "/v1/jobs/999/failures"] {
        let (st, _) = t.get(path).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{path}");
    }
    let (st, _) = t.post(&format!("/v1/jobs/{job}/cancel")).await;
    assert_eq!(st, StatusCode::CONFLICT, "a done job cannot be cancelled");
    drop(stream);
    // Shutdown ends open event streams instead of waiting on them.
    let resp = t.client.get(format!("{}/v1/jobs/{job}/events", t.url)).send().await.unwrap();
    let started = std::time::Instant::now();
    t.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(4), "shutdown waited {:?} on an event stream", started.elapsed());
    drop(resp);
}

#[tokio::test]
async fn the_page_is_embedded_and_its_data_needs_the_token() {
    let mock = MockOpenAi::start().await;
    let t = TestApp::start_with(|s| {
        distill_tests::harness::with_mock(s, &mock);
        s.api_token = Some("s3cret".into());
    })
    .await;
    let get = |path: &str| t.client.get(format!("{}{path}", t.url)).send();
    let page = get("/").await.unwrap();
    assert_eq!(page.status(), StatusCode::OK, "the page itself is public: it holds no data");
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-eval"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(html.contains("/ui/app.js") && html.contains("/ui/style.css"), "{html}");
    let js = get("/ui/app.js").await.unwrap();
    assert!(js.headers()["content-type"].to_str().unwrap().starts_with("text/javascript"));
    let js = js.text().await.unwrap();
    assert!(js.len() > 1000);
    for sink in [".innerHTML", ".outerHTML", "insertAdjacentHTML(", "document.write(", "eval(", "new Function("] {
        assert!(!js.contains(sink), "app.js uses {sink}: server data must only ever be inserted as text");
    }
    assert_eq!(get("/ui/style.css").await.unwrap().status(), StatusCode::OK);
    assert_eq!(get("/ui/secrets.txt").await.unwrap().status(), StatusCode::NOT_FOUND);
    for path in ["/v1/jobs", "/v1/jobs/1/events", "/v1/jobs/1/throughput", "/v1/jobs/1/failures"] {
        assert_eq!(get(path).await.unwrap().status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    let resp = t
        .client
        .post(format!("{}/v1/jobs/preview", t.url))
        .json(&json!({"prompt_set": 1, "teacher": "mock"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let ok = t.client.get(format!("{}/v1/jobs", t.url)).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
}

/// A database from before the web UI (schema version 3) gets its existing prompts and answers
/// indexed and its done answers counted per second when the server opens it.
#[tokio::test]
async fn a_version_3_database_gets_its_rows_indexed_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gen.sqlite");
    {
        let pool = distill_tests::harness::database_at_version(&path, 3).await;
        for sql in [
            "INSERT INTO prompt_sets (id, name, source, prompt_count, created_at) VALUES (1, 'old', 'json', 2, 0)",
            "INSERT INTO prompts (id, prompt_set_id, position, prompt, system) VALUES (1, 1, 0, 'an old walrus prompt', 'be a narwhal')",
            r#"INSERT INTO prompts (id, prompt_set_id, position, messages) VALUES (2, 1, 1, '[{"role":"user","content":"old penguin chat"}]')"#,
            "INSERT INTO completions (id, cache_key, teacher_identity, endpoint, request, text, latency_ms, http_attempts, created_at, completion_tokens)
             VALUES (7, 'k', 't', 'chat', '[]', 'an answer about a yak', 5, 1, 0, 9)",
            "INSERT INTO jobs (id, prompt_set_id, teacher, teacher_identity, status, params, created_at, updated_at, started_at, finished_at)
             VALUES (1, 1, 't', 't', 'done', '{}', 0, 0, 10000, 13000)",
            "INSERT INTO generations (job_id, prompt_id, status, cache_key, completion_id, finished_at) VALUES (1, 1, 'done', 'k', 7, 12345)",
            "INSERT INTO generations (job_id, prompt_id, status, cache_key, completion_id, finished_at) VALUES (1, 2, 'done', 'k', 7, 12999)",
        ] {
            sqlx::query(sql).execute(&pool).await.unwrap();
        }
        pool.close().await;
    }
    let db = server::db::Db::open(&path).await.unwrap();
    let hits = |table: &'static str, q: &'static str| {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&format!("SELECT rowid FROM {table} WHERE {table} MATCH ? ORDER BY rowid"))
                .bind(server::domain::search::TextSearch::parse(q).unwrap().fts_expr().to_string())
                .fetch_all(&db.reader)
                .await
                .unwrap()
        }
    };
    assert_eq!(hits("prompts_fts", "walrus").await, vec![1]);
    assert_eq!(hits("prompts_fts", "narwhal").await, vec![1]);
    assert_eq!(hits("prompts_fts", "penguin").await, vec![2]);
    assert!(hits("prompts_fts", "content").await.is_empty());
    assert_eq!(hits("completions_fts", "yak").await, vec![7]);
    // Its done answers are counted per second for the throughput chart.
    let seconds: Vec<(i64, i64, i64, i64)> =
        sqlx::query_as("SELECT job_id, second, answers, tokens FROM job_seconds").fetch_all(&db.reader).await.unwrap();
    assert_eq!(seconds, vec![(1, 12, 2, 18)]);
    // Deleting the job and the set takes their rows out of both.
    sqlx::query("DELETE FROM jobs WHERE id = 1").execute(&db.writer).await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM job_seconds").fetch_one(&db.reader).await.unwrap();
    assert_eq!(left, 0);
    sqlx::query("DELETE FROM prompt_sets WHERE id = 1").execute(&db.writer).await.unwrap();
    assert!(hits("prompts_fts", "walrus").await.is_empty());
}
