//! Server throughput benchmark.
//!
//! 1. Answers persisted per second against an instant mock teacher (target ≥ 2,000/s).
//! 2. End-to-end throughput against a slow mock (50 ms per request): the server versus a bare
//!    async client sending the same requests at the same concurrency (target ≥ 0.97×).
//!
//! Run: `cargo bench -p distill-tests --bench throughput` (env: BENCH_N, BENCH_SLOW_N,
//! BENCH_CONCURRENCY, BENCH_LATENCY_MS).

use std::sync::Arc;
use std::time::{Duration, Instant};

use distill_tests::harness::{test_settings, TestApp};
use distill_tests::mock_openai::MockOpenAi;
use serde_json::json;
use server::config::{Settings, TeacherSpec};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn start(mock: &MockOpenAi, in_flight: usize) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let mut s = test_settings(dir.path());
    let mut t = Settings::teacher_defaults("mock", TeacherSpec::parse(&mock.spec()).unwrap());
    t.max_in_flight = in_flight;
    s.teachers.push(t);
    TestApp::start_in(dir, s).await
}

/// Timings of one job, from the database's own millisecond timestamps.
struct JobTimes {
    /// Submission (POST /v1/jobs returned) to the last answer committed.
    end_to_end: f64,
    /// First claim to last answer committed: the queue's persisted rate.
    processing: f64,
}

/// Runs one job of `n` distinct prompts.
async fn run_job(t: &TestApp, n: usize, tag: &str) -> JobTimes {
    let prompts: Vec<String> = (0..n).map(|i| format!("{tag} prompt number {i}")).collect();
    let set = t.prompt_set(tag, &prompts).await;
    let job = t.job(json!({"prompt_set": set, "teacher": "mock", "max_new_tokens": 64})).await;
    let submitted = server::time::now_ms();
    loop {
        // Poll slowly: the poll's own queries must not slow down what is measured.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, v) = t.get(&format!("/v1/jobs/{job}")).await;
        if v["status"] == "done" {
            assert_eq!(v["counts"]["done"].as_i64().unwrap() as usize, n, "{v}");
            break;
        }
    }
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(&t.db_path).read_only(true);
    let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
    let (first, last): (i64, i64) =
        sqlx::query_as("SELECT min(started_at), max(finished_at) FROM generations WHERE job_id = ?")
            .bind(job)
            .fetch_one(&pool)
            .await
            .unwrap();
    pool.close().await;
    JobTimes {
        end_to_end: (last - submitted) as f64 / 1000.0,
        processing: (last - first) as f64 / 1000.0,
    }
}

/// The same requests from a bare client: `concurrency` tasks pulling from a shared counter.
async fn bare_client(url: &str, n: usize, concurrency: usize, tag: &str) -> f64 {
    let client = reqwest::Client::builder().pool_max_idle_per_host(concurrency).tcp_nodelay(true).build().unwrap();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let client = client.clone();
            let next = Arc::clone(&next);
            let url = format!("{url}/chat/completions");
            let tag = tag.to_string();
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    let body = json!({"model": "mock-model", "messages": [{"role": "user", "content": format!("{tag} prompt number {i}")}],
                                      "temperature": 0.0, "top_p": 1.0, "n": 1, "seed": 0, "max_tokens": 64, "stop": [], "stream": false});
                    let r = client.post(&url).json(&body).send().await.unwrap();
                    assert!(r.status().is_success());
                    let _: serde_json::Value = r.json().await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed().as_secs_f64()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let n = env_or("BENCH_N", 20_000);
        let slow_n = env_or("BENCH_SLOW_N", 2_000);
        let concurrency = env_or("BENCH_CONCURRENCY", 32);
        let latency = env_or("BENCH_LATENCY_MS", 50) as u64;

        let mock = MockOpenAi::start().await;
        mock.record_bodies(false);
        let t = start(&mock, 64).await;
        run_job(&t, 500, "warmup").await;
        let times = run_job(&t, n, "instant").await;
        println!(
            "instant mock: {n} answers persisted in {:.2} s = {:.0} answers/s (target >= 2000); \
             {:.0}/s counted from submission",
            times.processing,
            n as f64 / times.processing,
            n as f64 / times.end_to_end
        );
        t.shutdown().await;

        let mock = MockOpenAi::start().await;
        mock.record_bodies(false);
        mock.set_latency(Duration::from_millis(latency));
        let bare = bare_client(&mock.url, slow_n, concurrency, "bare").await;
        let bare_rate = slow_n as f64 / bare;
        let t = start(&mock, concurrency).await;
        let served = run_job(&t, slow_n, "served").await.end_to_end;
        let served_rate = slow_n as f64 / served;
        t.shutdown().await;
        let ideal = slow_n as f64 * latency as f64 / 1000.0 / concurrency as f64;
        println!(
            "slow mock ({latency} ms, concurrency {concurrency}, {slow_n} requests): bare client {bare_rate:.1}/s ({bare:.2} s), \
             server {served_rate:.1}/s ({served:.2} s), ratio {:.3} (target >= 0.97); ideal {ideal:.2} s",
            served_rate / bare_rate
        );
    });
}
