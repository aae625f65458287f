//! The local teacher (native engine, in-process) on the real SmolLM2 GGUF, end to end through
//! the server, against llama.cpp's greedy answers in tests/fixtures/smollm2/greedy.jsonl.

use std::time::Duration;

use distill_tests::harness::{header_only_gguf, smollm2_greedy_fixtures, smollm2_gguf, TestApp};
use serde_json::{json, Value};
use server::config::{Settings, TeacherSpec};
use server::model::chat_template::ChatTemplate;
use server::model::gguf::GgufMetadata;

fn fixtures() -> Vec<Value> {
    smollm2_greedy_fixtures()
}

fn local(name: &str, path: &std::path::Path) -> server::config::TeacherSettings {
    let mut t = Settings::teacher_defaults(name, TeacherSpec::parse(&format!("local:{}", path.display())).unwrap());
    t.max_in_flight = 8;
    t
}

#[test]
fn chat_template_renders_exactly_what_llama_cpp_rendered() {
    let meta = GgufMetadata::read(&smollm2_gguf()).unwrap();
    let tmpl = ChatTemplate::new(meta.opt_string("tokenizer.chat_template").unwrap(), "<|im_start|>", "<|im_end|>").unwrap();
    for f in fixtures() {
        let msgs = vec![server::domain::prompt_set::Message { role: "user".into(), content: f["prompt"].as_str().unwrap().into() }];
        assert_eq!(tmpl.render(&msgs).unwrap(), f["rendered"].as_str().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_teacher_answers_like_llama_cpp_and_records_token_ids() {
    let t = TestApp::start_with(|s| s.teachers.push(local("smol", &smollm2_gguf()))).await;
    let fx: Vec<Value> = fixtures().into_iter().take(8).collect();
    let prompts: Vec<String> = fx.iter().map(|f| f["prompt"].as_str().unwrap().to_string()).collect();
    let set = t.prompt_set("fixtures", &prompts).await;
    let job = t.job(json!({"prompt_set": set, "teacher": "smol", "max_new_tokens": 64})).await;
    let v = t.wait_done(job, Duration::from_secs(600)).await;
    assert_eq!(v["counts"]["done"], 8, "{v}");
    let gens = t.all_generations(job, None).await;
    let (mut same_prefix, mut before_tie) = (0usize, 0usize);
    for (g, f) in gens.iter().zip(&fx) {
        assert_eq!(g["prompt_token_ids"], f["prompt_ids"], "prompt ids differ for {}", f["id"]);
        let ours: Vec<u64> = g["completion_token_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
        let theirs: Vec<u64> = f["answer_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
        let margins: Vec<f64> = f["top2_margin"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        // Free-running greedy decoding follows llama.cpp up to its first near-tie (where
        // float rounding may legitimately pick the other token), save rare earlier splits.
        let until = margins.iter().position(|m| *m < 0.1).unwrap_or(theirs.len());
        let agree = ours.iter().zip(&theirs).take_while(|(a, b)| a == b).count();
        same_prefix += agree.min(until);
        before_tie += until;
        assert_eq!(g["completion_tokens"].as_u64().unwrap() as usize, ours.len());
        let finish = g["finish_reason"].as_str().unwrap();
        assert!((finish == "length") == (ours.len() == 64) || finish == "stop", "{g}");
        if agree == theirs.len() && ours.len() == theirs.len() {
            assert_eq!(g["text"], f["answer_text"]);
        }
    }
    eprintln!("free-running greedy: {same_prefix}/{before_tie} tokens before llama.cpp's first near-tie are identical");
    assert!(same_prefix as f64 >= 0.9 * before_tie as f64, "{same_prefix}/{before_tie}");
    // Stop strings cut the text and end the answer.
    let job = t.job(json!({"prompt_set": set, "teacher": "smol", "max_new_tokens": 64, "stop": ["."]})).await;
    t.wait_done(job, Duration::from_secs(600)).await;
    for g in t.all_generations(job, None).await {
        assert!(!g["text"].as_str().unwrap().contains('.'), "{g}");
        assert_eq!(g["finish_reason"], "stop", "{g}");
    }
    t.shutdown().await;
}

#[tokio::test]
async fn missing_or_corrupt_models_leave_the_server_up_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.gguf");
    std::fs::write(&corrupt, b"GGUF this is not a model").unwrap();
    let missing = dir.path().join("missing.gguf");
    let gemma = dir.path().join("gemma3.gguf");
    header_only_gguf(&gemma, "gemma3");
    let t = TestApp::start_with(|s| {
        s.teachers.push(local("gone", &missing));
        s.teachers.push(local("bad", &corrupt));
        s.teachers.push(local("gemma", &gemma));
    })
    .await;
    let (st, teachers) = t.get("/v1/teachers").await;
    assert_eq!(st, 200);
    for tch in teachers.as_array().unwrap() {
        assert!(tch["error"].as_str().unwrap().contains("could not load"), "{tch}");
    }
    // Gemma 3: neither engine runs it (mistralrs would panic on it); the message says so.
    let gemma_error = teachers.as_array().unwrap().iter().find(|x| x["name"] == "gemma").unwrap()["error"].to_string();
    assert!(gemma_error.contains("architecture `gemma3`"), "{gemma_error}");
    let set = t.prompt_set("x", &["hi".to_string()]).await;
    for name in ["gone", "bad", "gemma"] {
        let (st, e) = t.post_json("/v1/jobs", json!({"prompt_set": set, "teacher": name})).await;
        assert_eq!(st, 400, "{e}");
        assert_eq!(e["error"]["field"], "teacher");
    }
    assert_eq!(t.get("/health").await.0, 200);
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_template_file_overrides_the_models_own() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain.j2");
    std::fs::write(&file, "Question: {{ messages[-1]['content'] | trim }}\nAnswer:").unwrap();
    let t = TestApp::start_with(|s| {
        let mut teacher = local("plain", &smollm2_gguf());
        teacher.chat_template = Some(file.clone());
        s.teachers.push(teacher);
    })
    .await;
    let set = t.prompt_set("p", &["  What is 2+2?  ".to_string()]).await;
    let job = t.job(json!({"prompt_set": set, "teacher": "plain", "max_new_tokens": 4})).await;
    t.wait_done(job, Duration::from_secs(120)).await;
    let g = &t.all_generations(job, None).await[0];
    let tok = server::model::tokenizer::ModelTokenizer::from_metadata(&GgufMetadata::read(&smollm2_gguf()).unwrap()).unwrap();
    let want = tok.encode("Question: What is 2+2?\nAnswer:", true).unwrap();
    let got: Vec<u32> = g["prompt_token_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    assert_eq!(got, want);
    t.shutdown().await;
}
