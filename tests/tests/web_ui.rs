//! The web UI end to end in headless Chromium (Debian's `chromium`, driven by `playwright-core`
//! from npm; `.ci/run` installs both): the real server with the SmolLM2 local teacher, and
//! `tests/ui/e2e.mjs` doing through the page what a user does — log in with a token, upload a
//! prompt set (CSV, Parquet and JSONL), start a soft-label job, pause and resume it, watch it
//! finish, search and open generations, see the token colouring, export. Screenshots go to the
//! folder it prints.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use distill_tests::harness::{repo_root, smollm2_gguf, TestApp};
use server::config::{Settings, TeacherSpec};

fn local(name: &str) -> server::config::TeacherSettings {
    let spec = TeacherSpec::parse(&format!("local:{}", smollm2_gguf().display())).unwrap();
    let mut t = Settings::teacher_defaults(name, spec);
    t.max_in_flight = 8;
    t
}

/// Prompts a user might upload, and some that try to inject markup into the page.
fn prompts() -> Vec<String> {
    let mut p: Vec<String> = [
        "Name three primary colours.",
        "What is the capital of France?",
        "Give a synonym for happy.",
        "Write one sentence about the sea.",
        "What is 12 times 12?",
        "Explain photosynthesis in one sentence.",
        "<script>window.__pwned=1</script> Say hello.",
        "<img src=x onerror=\"window.__pwned=1\"> Describe this image tag.",
        "Repeat exactly: <b>bold</b> & <i>italic</i>",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let topics = ["rivers", "mountains", "clocks", "bread", "bicycles", "owls", "tea", "rain", "maps", "bees"];
    for (i, t) in topics.iter().cycle().take(31).enumerate() {
        p.push(format!("Tell me fact number {} about {t}.", i + 1));
    }
    p
}

/// A CSV file with a `prompt` column (every field quoted, quotes doubled).
fn csv(prompts: &[String]) -> String {
    let mut out = String::from("prompt\n");
    for p in prompts {
        out.push_str(&format!("\"{}\"\n", p.replace('"', "\"\"")));
    }
    out
}

/// A Parquet file with a `prompt` column.
fn parquet(prompts: &[String]) -> Vec<u8> {
    use std::sync::Arc;

    use arrow::array::StringArray;
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::record_batch::RecordBatch;
    let schema = Arc::new(Schema::new(vec![Field::new("prompt", DataType::Utf8, false)]));
    let column = Arc::new(StringArray::from(prompts.to_vec()));
    let batch = RecordBatch::try_new(schema.clone(), vec![column]).unwrap();
    let mut out = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    out
}

fn need(what: &str, ok: bool, fix: &str) {
    assert!(ok, "{what} is missing: {fix} (.ci/run does this)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn web_ui_end_to_end_in_headless_chromium() {
    let ui = repo_root().join("tests/ui");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    need("Chromium", PathBuf::from(&chromium).exists(), "apt-get install chromium");
    need("node", Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success()), "apt-get install nodejs");
    need("playwright-core", ui.join("node_modules/playwright-core").exists(), "npm ci --prefix tests/ui");

    let main = TestApp::start_with(|s| s.teachers.push(local("smol"))).await;
    let guarded = TestApp::start_with(|s| {
        s.teachers.push(local("smol"));
        s.api_token = Some("correct-horse-battery".into());
    })
    .await;
    let prompts_file = main.dir.path().join("ui-prompts.jsonl");
    let jsonl: String = prompts().iter().map(|p| serde_json::json!({ "prompt": p }).to_string() + "\n").collect();
    std::fs::write(&prompts_file, jsonl).unwrap();
    let csv_file = main.dir.path().join("ui-prompts.csv");
    std::fs::write(&csv_file, csv(&prompts())).unwrap();
    let parquet_file = main.dir.path().join("ui-prompts.parquet");
    std::fs::write(&parquet_file, parquet(&prompts())).unwrap();
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("web-ui-screenshots");
    let _ = std::fs::remove_dir_all(&shots);

    let started = Instant::now();
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(ui.join("e2e.mjs"))
        .env("DISTILL_URL", &main.url)
        .env("DISTILL_TEACHER", "smol")
        .env("DISTILL_TOKEN_URL", &guarded.url)
        .env("DISTILL_TOKEN", "correct-horse-battery")
        .env("DISTILL_PROMPTS", &prompts_file)
        .env("DISTILL_PROMPTS_CSV", &csv_file)
        .env("DISTILL_PROMPTS_PARQUET", &parquet_file)
        .env("DISTILL_SHOTS", &shots)
        .env("CHROMIUM", &chromium)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(900), cmd.output())
        .await
        .expect("e2e.mjs finished within 15 minutes")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("--- e2e.mjs ({:.0} s) ---\n{stdout}\n{stderr}", started.elapsed().as_secs_f64());
    eprintln!("screenshots: {}", shots.display());
    assert!(out.status.success() && stdout.contains("e2e: ok"), "the browser test failed (screenshots in {})", shots.display());

    // What the page did is what the store holds: one job, every prompt answered with soft labels.
    let (_, jobs) = main.get("/v1/jobs").await;
    let job = &jobs[0];
    assert_eq!(jobs.as_array().unwrap().len(), 1, "{jobs}");
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["counts"]["done"].as_i64().unwrap(), prompts().len() as i64, "{job}");
    assert_eq!(job["params"]["logprobs"], 5, "{job}");
    assert_eq!(job["params"]["max_new_tokens"], 24, "{job}");
    let (_, guarded_jobs) = guarded.get("/v1/jobs").await;
    assert_eq!(guarded_jobs["error"]["code"], "unauthorized");
    for name in ["token-form", "token-logged-in", "newjob-preview", "job-paused", "job-done", "job-done-narrow", "jobs", "generations-done", "generation-tokens"] {
        let found = std::fs::read_dir(&shots).unwrap().flatten().any(|e| e.file_name().to_string_lossy().contains(name));
        assert!(found, "no screenshot named *{name}* in {}", shots.display());
    }
}
