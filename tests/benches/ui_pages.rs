//! The web UI's API calls on a 100,000-generation job.
//!
//! Builds the job with the instant mock teacher (1 % of requests refused, so the failures panel
//! has something to group), then times every call the pages make — the jobs list, the job view
//! and its event stream, throughput, failures, generation pages at the start, the middle and the
//! end, status filters, searches that match everything, one row or nothing, one generation with
//! its token texts — and prints each call's median and worst time and the slowest of all. When
//! Chromium and `tests/ui/node_modules` are there it then drives the real page over the same job
//! (`tests/ui/bench-pages.mjs`) and reports the slowest call the browser made.
//!
//! Run: `cargo bench -p distill-tests --bench ui_pages` (env: BENCH_N, default 100000;
//! BENCH_REPEAT, default 20).

use std::time::{Duration, Instant};

use distill_tests::harness::{repo_root, test_settings, TestApp};
use distill_tests::mock_openai::{Fault, MockOpenAi};
use serde_json::json;
use server::config::{Settings, TeacherSpec};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Median and worst wall time of `repeat` GETs of `path`, in milliseconds.
async fn time_get(t: &TestApp, path: &str, repeat: usize) -> (f64, f64) {
    let mut ms = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        let start = Instant::now();
        let resp = t.client.get(format!("{}{path}", t.url)).send().await.unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        resp.bytes().await.unwrap();
        ms.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    (ms[ms.len() / 2], ms[ms.len() - 1])
}

/// Time to the first message of the job's event stream.
async fn time_first_event(t: &TestApp, job: i64, repeat: usize) -> (f64, f64) {
    let mut ms = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        let start = Instant::now();
        let mut resp = t.client.get(format!("{}/v1/jobs/{job}/events", t.url)).send().await.unwrap();
        let mut got = String::new();
        while !got.contains("\n\n") {
            got.push_str(std::str::from_utf8(&resp.chunk().await.unwrap().unwrap()).unwrap());
        }
        ms.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    (ms[ms.len() / 2], ms[ms.len() - 1])
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let n = env_or("BENCH_N", 100_000);
        let repeat = env_or("BENCH_REPEAT", 20);
        let mock = MockOpenAi::start().await;
        mock.record_bodies(false);
        let dir = tempfile::tempdir().unwrap();
        let mut s = test_settings(dir.path());
        let mut teacher = Settings::teacher_defaults("mock", TeacherSpec::parse(&mock.spec()).unwrap());
        teacher.max_in_flight = 64;
        s.teachers.push(teacher);
        s.max_attempts = 1;
        let t = TestApp::start_in(dir, s).await;

        let words = ["river", "mountain", "clock", "bread", "bicycle", "owl", "tea", "rain", "map", "bee"];
        let mut prompts: Vec<String> =
            (0..n).map(|i| format!("Tell me fact number {i} about {}s.", words[i % words.len()])).collect();
        prompts[n - 10] = "A unique zeppelin question near the end.".into();
        let built = Instant::now();
        let set = t.prompt_set("hundred-k", &prompts).await;
        mock.push_faults((0..n / 100).map(|_| Fault::BadRequest));
        let job = t.job(json!({"prompt_set": set, "teacher": "mock", "max_new_tokens": 64})).await;
        let v = t
            .wait_job(job, Duration::from_secs(1800), |v| v["status"] == "done")
            .await;
        println!(
            "job {job}: {} done, {} failed, built in {:.1} s (database {})",
            v["counts"]["done"],
            v["counts"]["failed"],
            built.elapsed().as_secs_f64(),
            t.db_path.display()
        );

        let page = |q: &str| format!("/v1/jobs/{job}/generations?limit=50{q}");
        let ids: Vec<i64> = {
            let all = t.all_generations(job, None).await;
            all.iter().map(|g| g["id"].as_i64().unwrap()).collect()
        };
        let middle = ids[ids.len() / 2];
        let near_end = ids[ids.len() - 51];
        let (_, failed) = t.get(&page("&status=failed")).await;
        let failed_id = failed["items"][0]["id"].as_i64().unwrap();
        let calls: Vec<(String, String)> = vec![
            ("jobs list (polled every 2 s)".into(), "/v1/jobs".into()),
            ("job view".into(), format!("/v1/jobs/{job}")),
            ("throughput, 60 buckets".into(), format!("/v1/jobs/{job}/throughput?buckets=60")),
            ("failures by reason".into(), format!("/v1/jobs/{job}/failures")),
            ("generations, first page".into(), page("")),
            ("generations, middle page".into(), page(&format!("&after={middle}"))),
            ("generations, last page".into(), page(&format!("&after={near_end}"))),
            ("status=done, middle page".into(), page(&format!("&status=done&after={middle}"))),
            ("status=failed, first page".into(), page("&status=failed")),
            ("search matching every row".into(), page("&q=fact")),
            ("search matching a tenth, middle".into(), page(&format!("&q=owls&after={middle}"))),
            ("search matching one row near the end".into(), page("&q=zeppelin")),
            ("search matching nothing".into(), page("&q=xylophone")),
            ("search + status=failed".into(), page("&q=fact&status=failed")),
            ("one generation + token texts".into(), format!("/v1/generations/{middle}?token_texts=true")),
            ("one failed generation".into(), format!("/v1/generations/{failed_id}")),
        ];
        println!("\n| call the page makes | median ms | worst ms (of {repeat}) |\n|---|---|---|");
        let mut slowest = (String::new(), 0.0f64);
        for (name, path) in &calls {
            let (med, worst) = time_get(&t, path, repeat).await;
            println!("| {name} `{}` | {med:.1} | {worst:.1} |", path.replace(&format!("/{job}/"), "/{id}/"));
            if worst > slowest.1 {
                slowest = (name.clone(), worst);
            }
        }
        let (med, worst) = time_first_event(&t, job, repeat).await;
        println!("| job events, first message | {med:.1} | {worst:.1} |");
        if worst > slowest.1 {
            slowest = ("job events, first message".into(), worst);
        }
        println!("\nslowest API call: {} at {:.1} ms", slowest.0, slowest.1);

        let ui = repo_root().join("tests/ui");
        let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        if ui.join("node_modules/playwright-core").exists() && std::path::Path::new(&chromium).exists() {
            let out = tokio::process::Command::new("node")
                .arg(ui.join("bench-pages.mjs"))
                .env("DISTILL_URL", &t.url)
                .env("DISTILL_JOB", job.to_string())
                .env("DISTILL_SEARCH", "zeppelin")
                .env("CHROMIUM", &chromium)
                .output()
                .await
                .expect("node runs");
            println!("\n--- the page in Chromium ---\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success(), "bench-pages.mjs failed");
        } else {
            println!("\n(no Chromium or tests/ui/node_modules: the in-browser part was skipped; `npm ci --prefix tests/ui`)");
        }
        t.shutdown().await;
    });
}
