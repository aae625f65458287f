//! The real binary, killed and restarted: nothing completed is lost or asked again.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use distill_tests::harness::ServerProcess;
use distill_tests::mock_openai::MockOpenAi;
use serde_json::{json, Value};

struct Client {
    http: reqwest::Client,
    url: String,
}

impl Client {
    async fn get(&self, path: &str) -> Value {
        self.http.get(format!("{}{path}", self.url)).send().await.unwrap().json().await.unwrap()
    }
    async fn post(&self, path: &str, body: Value) -> Value {
        let r = self.http.post(format!("{}{path}", self.url)).json(&body).send().await.unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        r.json().await.unwrap()
    }
}

fn args(db: &std::path::Path, mock: &MockOpenAi) -> Vec<String> {
    vec![
        "--db".into(),
        db.display().to_string(),
        "--teacher".into(),
        format!("mock={}", mock.spec()),
        "--max-in-flight".into(),
        "8".into(),
        "--request-timeout-secs".into(),
        "5".into(),
    ]
}

/// (prompt text → (generation id, answer)) for every done generation, read from the file.
async fn done_rows(db: &std::path::Path) -> HashMap<String, (i64, String)> {
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(db).read_only(true);
    let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
    let rows: Vec<(String, i64, String)> = sqlx::query_as(
        "SELECT p.prompt, g.id, c.text FROM generations g JOIN prompts p ON p.id = g.prompt_id
         JOIN completions c ON c.id = g.completion_id WHERE g.status = 'done'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    rows.into_iter().map(|(p, id, t)| (p, (id, t))).collect()
}

async fn wait_done_count(c: &Client, job: i64, at_least: i64) -> Value {
    let start = Instant::now();
    loop {
        let v = c.get(&format!("/v1/jobs/{job}")).await;
        if v["counts"]["done"].as_i64().unwrap() >= at_least || v["status"] == "done" {
            return v;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "stuck: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_any_moment_loses_nothing_and_asks_nothing_twice() {
    let mock = MockOpenAi::start().await;
    mock.set_latency(Duration::from_millis(25));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gen.sqlite");
    let log = dir.path().join("server.log");
    let n = 400;
    let prompts: Vec<String> = (0..n).map(|i| format!("crash prompt {i}")).collect();

    let mut server = ServerProcess::start(&args(&db, &mock), log.clone()).await;
    let mut c = Client { http: reqwest::Client::new(), url: server.url.clone() };
    let items: Vec<Value> = prompts.iter().map(|p| json!({"prompt": p})).collect();
    let set = c.post("/v1/prompt-sets", json!({"name": "crash", "prompts": items})).await["id"].as_i64().unwrap();
    let job = c.post("/v1/jobs", json!({"prompt_set": set, "teacher": "mock"})).await["id"].as_i64().unwrap();

    let mut kept: HashMap<String, (i64, String)> = HashMap::new();
    // Teacher calls per prompt at the moment of each kill, for prompts already done then.
    let mut asked_at_kill: Vec<HashMap<String, u32>> = Vec::new();
    for (round, kill_after) in [60, 170, 290].into_iter().enumerate() {
        wait_done_count(&c, job, kill_after).await;
        // Kill at an arbitrary moment within the next few milliseconds.
        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 15)).await;
        server.kill9();
        let done = done_rows(&db).await;
        for (p, row) in &kept {
            assert_eq!(done.get(p), Some(row), "round {round}: a committed answer changed or vanished");
        }
        assert!(done.len() >= kill_after as usize);
        let answered = mock.answered();
        asked_at_kill.push(done.keys().map(|p| (p.clone(), answered[p])).collect());
        kept = done;
        server = ServerProcess::start(&args(&db, &mock), log.clone()).await;
        c.url = server.url.clone();
    }
    let v = wait_done_count(&c, job, n as i64).await;
    let start = Instant::now();
    let mut v = v;
    while v["status"] != "done" {
        assert!(start.elapsed() < Duration::from_secs(30), "{v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        v = c.get(&format!("/v1/jobs/{job}")).await;
    }
    assert_eq!(v["counts"]["done"], n as i64, "{v}");

    let done = done_rows(&db).await;
    assert_eq!(done.len(), n, "every prompt has exactly one done generation");
    for (p, row) in &kept {
        assert_eq!(done.get(p), Some(row));
    }
    let answered = mock.answered();
    for p in &prompts {
        assert_eq!(done[p].1, MockOpenAi::answer_for(p));
        let asked = answered.get(p).copied().unwrap_or(0);
        assert!(asked >= 1);
    }
    // Done before a kill: never asked again after it.
    for snapshot in &asked_at_kill {
        for (p, n) in snapshot {
            assert_eq!(answered[p], *n, "{p} was asked again after it was committed");
        }
    }
    // Only requests in flight at a kill can be repeated: at most 8 per kill.
    let repeats: u32 = answered.values().map(|n| n - 1).sum();
    assert!(repeats <= 3 * 8, "{repeats} repeated requests");
    eprintln!("{n} prompts, 3 SIGKILLs, {repeats} requests repeated (in flight at a kill)");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_before_exiting() {
    let mock = MockOpenAi::start().await;
    mock.set_latency(Duration::from_millis(800));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gen.sqlite");
    let mut server = ServerProcess::start(&args(&db, &mock), dir.path().join("server.log")).await;
    let c = Client { http: reqwest::Client::new(), url: server.url.clone() };
    let items: Vec<Value> = (0..40).map(|i| json!({"prompt": format!("drain {i}")})).collect();
    let set = c.post("/v1/prompt-sets", json!({"name": "d", "prompts": items})).await["id"].as_i64().unwrap();
    let job = c.post("/v1/jobs", json!({"prompt_set": set, "teacher": "mock"})).await["id"].as_i64().unwrap();
    let start = Instant::now();
    loop {
        let v = c.get(&format!("/v1/jobs/{job}")).await;
        if v["counts"]["running"] == 8 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let requests_before = mock.total_requests();
    let status = server.terminate(Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    let done = done_rows(&db).await;
    // Everything that was in flight finished and was recorded; nothing new was started.
    assert_eq!(mock.total_requests(), requests_before);
    assert_eq!(done.len() as u64, requests_before, "in-flight answers were kept");
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(&db).read_only(true);
    let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
    let running: i64 = sqlx::query_scalar("SELECT count(*) FROM generations WHERE status = 'running'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(running, 0);
}
