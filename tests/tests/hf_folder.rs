//! `local:DIR` with an HF folder (config.json + safetensors + tokenizer.json): the SmolLM2 GGUF
//! converted to an f32 HF folder (Q/K rows back in HF order, the tokenizer and template written
//! out) must load as a teacher and answer like the GGUF does.

use std::path::Path;
use std::time::Duration;

use distill_tests::harness::{smollm2_greedy_fixtures, smollm2_gguf, TestApp};
use serde_json::{json, Value};
use server::config::{Settings, TeacherSpec};
use server::engine::llama::{argmax, Chunk, KvCache, Llama, Precision};
use server::model::gguf::GgufMetadata;
use server::model::hf::{read_gguf_as_hf, write_folder, HfFolder};
use server::model::tokenizer::ModelTokenizer;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The SmolLM2 GGUF as an HF folder, written once per test run.
fn smollm2_hf(dir: &Path) {
    let gguf = smollm2_gguf();
    let meta = GgufMetadata::read(&gguf).unwrap();
    let tok = ModelTokenizer::from_metadata(&meta).unwrap();
    let (cfg, tensors) = read_gguf_as_hf(&gguf).unwrap();
    write_folder(dir, &cfg, &tensors, &tok, meta.opt_string("tokenizer.chat_template")).unwrap();
}

#[test]
fn hf_folder_matches_the_gguf_tokenizer_template_and_argmax() {
    let dir = tempfile::tempdir().unwrap();
    smollm2_hf(dir.path());
    for f in ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    let folder = HfFolder::open(dir.path()).unwrap();
    assert_eq!(folder.config.num_hidden_layers, 30);
    assert!(folder.config.tie_word_embeddings);
    let gguf_tok = ModelTokenizer::from_metadata(&GgufMetadata::read(&smollm2_gguf()).unwrap()).unwrap();
    let hf_tok = folder.tokenizer().unwrap();
    assert_eq!(hf_tok.special, gguf_tok.special);
    let fx = smollm2_greedy_fixtures();
    let meta = GgufMetadata::read(&smollm2_gguf()).unwrap();
    assert_eq!(folder.chat_template().unwrap().as_deref(), meta.opt_string("tokenizer.chat_template"));
    for f in &fx {
        // The rendered prompt tokenizes to llama.cpp's ids through the written tokenizer.json.
        assert_eq!(hf_tok.encode(f["rendered"].as_str().unwrap(), true).unwrap(), ids(&f["prompt_ids"]), "{}", f["id"]);
    }
    // Teacher forcing on llama.cpp's answers: the folder's model (Q8_0 from f32 dequantized
    // Q4_1) picks the same tokens as the GGUF on the native engine nearly everywhere.
    let hf = Llama::load_hf(&folder, Precision::Quantized).unwrap();
    let gg = Llama::load(&smollm2_gguf(), Precision::Quantized).unwrap();
    assert_eq!(hf.cfg, gg.cfg);
    let (mut same, mut vs_llama_cpp, mut total) = (0, 0, 0);
    for f in fx.iter().take(12) {
        let prompt = ids(&f["prompt_ids"]);
        let answer = ids(&f["answer_ids"]);
        let mut input = prompt.clone();
        input.extend_from_slice(&answer[..answer.len() - 1]);
        let run = |m: &Llama| {
            let mut cache = KvCache::new(&m.cfg);
            m.forward(&mut [Chunk { cache: &mut cache, tokens: &input, all_logits: true }]).unwrap().remove(0)
        };
        let (a, b) = (run(&hf), run(&gg));
        let v = hf.cfg.vocab;
        for (i, want) in answer.iter().enumerate() {
            let row = prompt.len() - 1 + i;
            let (x, y) = (argmax(&a[row * v..(row + 1) * v]), argmax(&b[row * v..(row + 1) * v]));
            total += 1;
            same += (x == y) as usize;
            vs_llama_cpp += (x == *want) as usize;
        }
    }
    eprintln!("HF folder vs GGUF argmax: {same}/{total}; vs llama.cpp: {vs_llama_cpp}/{total}");
    assert!(same as f64 >= 0.97 * total as f64, "{same}/{total}");
    assert!(vs_llama_cpp as f64 >= 0.96 * total as f64, "{vs_llama_cpp}/{total}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hf_folder_serves_as_a_local_teacher() {
    let models = tempfile::tempdir().unwrap();
    let folder = models.path().join("smollm2-hf");
    smollm2_hf(&folder);
    let broken = models.path().join("no-tokenizer");
    std::fs::create_dir(&broken).unwrap();
    std::fs::copy(folder.join("config.json"), broken.join("config.json")).unwrap();
    let t = TestApp::start_with(|s| {
        for (name, path) in [("hf", &folder), ("broken", &broken)] {
            let mut t = Settings::teacher_defaults(name, TeacherSpec::parse(&format!("local:{}", path.display())).unwrap());
            t.max_in_flight = 4;
            s.teachers.push(t);
        }
    })
    .await;
    let (_, teachers) = t.get("/v1/teachers").await;
    let by_name = |n: &str| teachers.as_array().unwrap().iter().find(|x| x["name"] == n).unwrap().clone();
    assert!(by_name("hf")["error"].is_null(), "{teachers}");
    let err = by_name("broken")["error"].as_str().unwrap().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");

    let fx: Vec<Value> = smollm2_greedy_fixtures().into_iter().take(4).collect();
    let prompts: Vec<String> = fx.iter().map(|f| f["prompt"].as_str().unwrap().to_string()).collect();
    let set = t.prompt_set("fixtures", &prompts).await;
    let job = t.job(json!({"prompt_set": set, "teacher": "hf", "max_new_tokens": 24})).await;
    let v = t.wait_done(job, Duration::from_secs(300)).await;
    assert_eq!(v["counts"]["done"], 4, "{v}");
    let mut first_tokens_same = 0;
    for (g, f) in t.all_generations(job, None).await.iter().zip(&fx) {
        assert_eq!(ids(&g["prompt_token_ids"]), ids(&f["prompt_ids"]));
        let ours = ids(&g["completion_token_ids"]);
        assert!(!ours.is_empty() && ours.len() <= 24);
        assert!(matches!(g["finish_reason"].as_str(), Some("stop" | "length")), "{g}");
        first_tokens_same += (ours[..4.min(ours.len())] == ids(&f["answer_ids"])[..4.min(ours.len())]) as usize;
    }
    assert!(first_tokens_same >= 3, "{first_tokens_same}/4 answers start like llama.cpp's");
    let (st, e) = t.post_json("/v1/jobs", json!({"prompt_set": set, "teacher": "broken"})).await;
    assert_eq!((st.as_u16(), e["error"]["field"].as_str()), (400, Some("teacher")), "{e}");
    t.shutdown().await;
}
