//! The mistralrs engine (cargo feature `mistralrs`), used for GGUF architectures the native
//! engine does not cover: the real SmolLM2 GGUF forced onto it must answer greedily like
//! llama.cpp with our token ids; architectures it cannot run, and files on which it panics,
//! must leave the server up with a clear error.
#![cfg(feature = "mistralrs")]

use std::path::Path;
use std::time::Duration;

use distill_tests::harness::{header_only_gguf, smollm2_greedy_fixtures, smollm2_gguf, TestApp};
use serde_json::{json, Value};
use server::config::{LocalEngine, Settings, TeacherSpec};

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn local(name: &str, path: &Path, engine: LocalEngine) -> server::config::TeacherSettings {
    let mut t = Settings::teacher_defaults(name, TeacherSpec::parse(&format!("local:{}", path.display())).unwrap());
    // Four requests at once: mistralrs must still answer each exactly (it runs them one by one).
    t.max_in_flight = 4;
    t.local_engine = engine;
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mistralrs_answers_greedily_with_our_token_ids() {
    let t = TestApp::start_with(|s| s.teachers.push(local("mrs", &smollm2_gguf(), LocalEngine::Mistralrs))).await;
    let (_, teachers) = t.get("/v1/teachers").await;
    assert!(teachers[0]["error"].is_null(), "{teachers}");
    let fx: Vec<Value> = smollm2_greedy_fixtures().into_iter().take(4).collect();
    let prompts: Vec<String> = fx.iter().map(|f| f["prompt"].as_str().unwrap().to_string()).collect();
    let set = t.prompt_set("fixtures", &prompts).await;
    let job = t.job(json!({"prompt_set": set, "teacher": "mrs", "max_new_tokens": 16})).await;
    let v = t.wait_done(job, Duration::from_secs(600)).await;
    assert_eq!(v["counts"]["done"], 4, "{v}");
    let (mut same, mut before_tie) = (0, 0);
    for (g, f) in t.all_generations(job, None).await.iter().zip(&fx) {
        assert_eq!(ids(&g["prompt_token_ids"]), ids(&f["prompt_ids"]));
        let ours = ids(&g["completion_token_ids"]);
        let theirs = ids(&f["answer_ids"]);
        assert_eq!(g["completion_tokens"].as_u64().unwrap() as usize, ours.len());
        let finish = g["finish_reason"].as_str().unwrap();
        assert!(ours.len() <= 16 && (finish == "stop" || ours.len() == 16), "{g}");
        let margins: Vec<f64> = f["top2_margin"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let until = margins.iter().position(|m| *m < 0.1).unwrap_or(theirs.len()).min(ours.len());
        let agree = ours.iter().zip(&theirs).take(until).take_while(|(a, b)| a == b).count();
        eprintln!("{}: {agree}/{until} identical; ours {ours:?}, llama.cpp {:?}", f["id"], &theirs[..until]);
        same += agree;
        before_tie += until;
    }
    eprintln!("mistralrs free-running greedy: {same}/{before_tie} tokens before the first near-tie identical to llama.cpp");
    assert!(same as f64 >= 0.95 * before_tie as f64, "{same}/{before_tie}");
    // Stop strings end the answer and cut the text.
    let job = t.job(json!({"prompt_set": set, "teacher": "mrs", "max_new_tokens": 24, "stop": [" "]})).await;
    t.wait_done(job, Duration::from_secs(600)).await;
    for g in t.all_generations(job, None).await {
        assert_eq!(g["finish_reason"], "stop", "{g}");
        assert!(!g["text"].as_str().unwrap().contains(' '), "{g}");
    }
    // Soft labels, read from the raw logits in our logits processor (mistralrs's own logprobs
    // are base 10 and −∞ for greedy alternatives), against our engine's log-softmax over the
    // same ids (mistralrs's arithmetic differs from ours, like llama.cpp's, by rounding).
    let job = t.job(json!({"prompt_set": set, "teacher": "mrs", "max_new_tokens": 16, "logprobs": 10})).await;
    t.wait_done(job, Duration::from_secs(600)).await;
    let model = server::engine::llama::Llama::load(&smollm2_gguf(), server::config::Precision::F32).unwrap();
    let v = model.cfg.vocab;
    let (_, page) = t.get(&format!("/v1/jobs/{job}/generations?soft_labels=true")).await;
    let (mut sum, mut n, mut worst) = (0f64, 0usize, 0f64);
    for g in page["items"].as_array().unwrap() {
        let (prompt, answer) = (ids(&g["prompt_token_ids"]), ids(&g["completion_token_ids"]));
        let s = &g["soft_labels"];
        assert_eq!(s["target_token_ids"].as_array().unwrap().len(), answer.len(), "{g}");
        let full: Vec<u32> = prompt.iter().chain(&answer).copied().collect();
        let mut cache = server::engine::llama::KvCache::new(&model.cfg);
        let all = model
            .forward(&mut [server::engine::llama::Chunk { cache: &mut cache, tokens: &full, all_logits: true }])
            .unwrap()
            .remove(0);
        for (i, &id) in answer.iter().enumerate() {
            let top = ids(&s["target_token_ids"][i]);
            let lps: Vec<f64> = s["target_logprobs"][i].as_array().unwrap().iter().map(|x| x.as_f64().unwrap_or(f64::NEG_INFINITY)).collect();
            assert_eq!(top[0], id, "greedy: the emitted token is the most likely ({g})");
            assert!(lps.windows(2).all(|w| w[0] >= w[1]) && lps.iter().map(|l| l.exp()).sum::<f64>() <= 1.0 + 1e-3);
            let row = &all[(prompt.len() - 1 + i) * v..(prompt.len() + i) * v];
            let lse = row.iter().map(|x| (*x as f64).exp()).sum::<f64>().ln();
            for (tid, lp) in top.iter().zip(&lps) {
                let d = (lp - (row[*tid as usize] as f64 - lse)).abs();
                sum += d;
                worst = worst.max(d);
                n += 1;
            }
        }
    }
    eprintln!("mistralrs soft labels vs our f32 engine: mean |Δ| {:.2e}, worst {worst:.2e} over {n} pairs", sum / n as f64);
    assert!(n > 0 && sum / (n as f64) < 0.15 && worst < 1.0, "mean {} worst {worst}", sum / n as f64);
    // Re-scoring needs the native engine: refused at submission.
    let (_, v) = t
        .post_json("/v1/prompt-sets", json!({"name": "a", "prompts": [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]}))
        .await;
    let (st, v) = t.post_json("/v1/jobs", json!({"prompt_set": v["id"], "teacher": "mrs", "mode": "rescore", "logprobs": 4})).await;
    assert_eq!(st, reqwest::StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("native engine"), "{v}");
    t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_architectures_and_loader_panics_leave_the_server_up() {
    let dir = tempfile::tempdir().unwrap();
    let gemma = dir.path().join("gemma3.gguf");
    header_only_gguf(&gemma, "gemma3");
    // qwen2 without its metadata: mistralrs indexes `qwen2.block_count` and panics.
    let qwen = dir.path().join("qwen2-broken.gguf");
    header_only_gguf(&qwen, "qwen2");
    let t = TestApp::start_with(|s| {
        s.teachers.push(local("gemma", &gemma, LocalEngine::Auto));
        s.teachers.push(local("qwen", &qwen, LocalEngine::Auto));
    })
    .await;
    let (_, teachers) = t.get("/v1/teachers").await;
    let error = |n: &str| -> String {
        teachers.as_array().unwrap().iter().find(|x| x["name"] == n).unwrap()["error"].as_str().unwrap_or_default().to_string()
    };
    assert!(error("gemma").contains("architecture `gemma3` is supported neither"), "{teachers}");
    // mistralrs indexes a missing metadata key and panics; the panic is caught at load.
    assert!(error("qwen").contains("mistralrs panicked while loading"), "{teachers}");
    eprintln!("qwen2 load error: {}", error("qwen"));
    let set = t.prompt_set("x", &["hi".to_string()]).await;
    for name in ["gemma", "qwen"] {
        let (st, e) = t.post_json("/v1/jobs", json!({"prompt_set": set, "teacher": name})).await;
        assert_eq!((st.as_u16(), e["error"]["field"].as_str()), (400, Some("teacher")), "{e}");
    }
    assert_eq!(t.get("/health").await.0, 200);
    t.shutdown().await;
}
