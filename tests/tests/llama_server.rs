//! Against a real OpenAI-compatible server: llama.cpp's (`llama-cpp-python[server]`) serving
//! the SmolLM2-135M-Instruct GGUF on loopback. Set up by `scripts/fetch-model.sh` and
//! `scripts/setup-llama-server.sh` (both run by `scripts/test.sh`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use distill_tests::harness::{free_port, TestApp};
use serde_json::{json, Value};
use server::config::{Settings, TeacherSpec};

struct LlamaServer {
    child: Child,
    url: String,
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The venv python and the model, or why they are missing.
fn prerequisites() -> Result<(PathBuf, PathBuf), String> {
    let python = distill_tests::harness::llama_python();
    let model = repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !python.exists() {
        return Err(format!("{} missing: run scripts/setup-llama-server.sh", python.display()));
    }
    if !model.exists() {
        return Err(format!("{} missing: run scripts/fetch-model.sh", model.display()));
    }
    Ok((python, model))
}

async fn start_llama() -> Option<LlamaServer> {
    let (python, model) = match prerequisites() {
        Ok(p) => p,
        Err(why) if std::env::var("DISTILL_SKIP_LLAMA").as_deref() == Ok("1") => {
            eprintln!("skipping the llama.cpp test (DISTILL_SKIP_LLAMA=1): {why}");
            return None;
        }
        Err(why) => panic!("{why} (or set DISTILL_SKIP_LLAMA=1 to skip this test)"),
    };
    let port = free_port();
    // One thread and batch size 1: fast on 2 cores, and results independent of request order.
    let child = Command::new(python)
        .args(["-m", "llama_cpp.server", "--model"])
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--n_ctx", "2048", "--n_threads", "1",
               "--n_threads_batch", "1", "--n_batch", "1", "--n_ubatch", "1", "--verbose", "false"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("llama_cpp.server starts");
    let server = LlamaServer { child, url: format!("http://127.0.0.1:{port}/v1") };
    let client = reqwest::Client::new();
    let start = Instant::now();
    loop {
        if let Ok(r) = client.get(format!("{}/models", server.url)).send().await {
            if r.status().is_success() {
                return Some(server);
            }
        }
        assert!(start.elapsed() < Duration::from_secs(120), "llama.cpp server did not start");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_llama_cpp_server_answers_greedily_and_everything_is_recorded() {
    let Some(llama) = start_llama().await else { return };
    let spec = format!("openai:{}#smollm2", llama.url);
    let t = TestApp::start_with(|s| {
        let mut teacher = Settings::teacher_defaults("llama", TeacherSpec::parse(&spec).unwrap());
        teacher.max_in_flight = 2;
        teacher.request_timeout = Duration::from_secs(120);
        s.teachers.push(teacher);
    })
    .await;
    let (_, teachers) = t.get("/v1/teachers").await;
    assert_eq!(teachers[0]["error"], Value::Null, "{teachers}");

    let prompts: Vec<String> =
        ["What is 7 times 8?", "Name the capital of France.", "Write one sentence about the sea.", "List three colours."]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let set = t.prompt_set("real", &prompts).await;
    let chat = t
        .job(json!({"prompt_set": set, "teacher": "llama", "max_new_tokens": 24, "stop": ["\n\n"], "seed": 1,
                    "system": "You are a helpful assistant. Answer briefly."}))
        .await;
    let raw = t
        .job(json!({"prompt_set": set, "teacher": "llama", "endpoint": "completions", "max_new_tokens": 12,
                    "template": "Question: {{ prompt }}\nAnswer:"}))
        .await;
    for job in [chat, raw] {
        let v = t.wait_done(job, Duration::from_secs(300)).await;
        assert_eq!(v["counts"]["done"], 4, "{v}");
        assert!(v["tokens_in"].as_i64().unwrap() > 0 && v["tokens_out"].as_i64().unwrap() > 0);
    }
    let client = reqwest::Client::new();
    for (job, max) in [(chat, 24), (raw, 12)] {
        for g in t.all_generations(job, None).await {
            assert_eq!(g["status"], "done", "{g}");
            assert_eq!(g["model"], "smollm2");
            let tokens = g["completion_tokens"].as_i64().unwrap();
            assert!(tokens <= max, "{g}");
            let finish = g["finish_reason"].as_str().unwrap();
            assert!(finish == "stop" || (finish == "length" && tokens == max), "{g}");
            assert!(g["prompt_tokens"].as_i64().unwrap() > 3);
            // A tiny model may end at once (EOS first): an empty answer is still an answer.
            assert_eq!(g["text"].as_str().unwrap().is_empty(), tokens == 0, "{g}");
            // Greedy: the same request sent by hand gets the same answer.
            let (path, body) = if job == chat {
                ("chat/completions", json!({"model": "smollm2", "messages": g["request"], "temperature": 0.0, "top_p": 1.0,
                                             "seed": 1, "max_tokens": max, "stop": ["\n\n"]}))
            } else {
                ("completions", json!({"model": "smollm2", "prompt": g["request"], "temperature": 0.0, "top_p": 1.0,
                                        "seed": 0, "max_tokens": max, "stop": []}))
            };
            let r: Value = client.post(format!("{}/{path}", llama.url)).json(&body).send().await.unwrap().json().await.unwrap();
            let text = if job == chat { &r["choices"][0]["message"]["content"] } else { &r["choices"][0]["text"] };
            assert_eq!(text, &g["text"], "not reproducible: {g}");
        }
    }
    let (_, body) = t.get_bytes(&format!("/v1/jobs/{chat}/export")).await;
    let rows: Vec<Value> = std::str::from_utf8(&body).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0]["messages"].as_array().unwrap().len(), 3);
    t.shutdown().await;
}
