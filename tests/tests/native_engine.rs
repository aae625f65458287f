//! The native engine on the real SmolLM2 GGUF against llama.cpp's own greedy answers
//! (tests/fixtures/smollm2/greedy.jsonl, made by scripts/make-reference-fixtures.py).

use distill_tests::harness::{smollm2_greedy_fixtures, smollm2_gguf};
use serde_json::Value;
use server::engine::llama::{argmax, Chunk, KvCache, Llama, Precision};

fn fixtures() -> Vec<Value> {
    smollm2_greedy_fixtures()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn teacher_forced_argmax_agrees_with_llama_cpp() {
    let model = Llama::load(&smollm2_gguf(), Precision::Quantized).unwrap();
    let mut agree = 0;
    let mut total = 0;
    let mut near_tie_misses = 0;
    for f in fixtures() {
        let prompt = ids(&f["prompt_ids"]);
        let answer = ids(&f["answer_ids"]);
        let margins: Vec<f64> = f["top2_margin"].as_array().unwrap().iter().map(|m| m.as_f64().unwrap()).collect();
        let mut input = prompt.clone();
        input.extend_from_slice(&answer[..answer.len() - 1]);
        let mut cache = KvCache::new(&model.cfg);
        let logits = model.forward(&mut [Chunk { cache: &mut cache, tokens: &input, all_logits: true }]).unwrap();
        let v = model.cfg.vocab;
        for (i, want) in answer.iter().enumerate() {
            let row = prompt.len() - 1 + i;
            let got = argmax(&logits[0][row * v..(row + 1) * v]);
            total += 1;
            if got == *want {
                agree += 1;
            } else {
                if margins[i] < 0.1 {
                    near_tie_misses += 1;
                }
                let row_logits = &logits[0][row * v..(row + 1) * v];
                eprintln!(
                    "miss {} pos {i}: llama.cpp {want} (margin {:.4}), ours {got}; our logit gap {:.4}",
                    f["id"], margins[i], row_logits[got as usize] - row_logits[*want as usize]
                );
            }
        }
    }
    let rate = agree as f64 / total as f64;
    eprintln!("teacher-forced argmax agreement with llama.cpp: {agree}/{total} = {:.2}% ({near_tie_misses} misses at near-ties)", rate * 100.0);
    assert!(rate >= 0.98, "agreement {:.2}% < 98%", rate * 100.0);
}

#[test]
fn batched_and_incremental_decoding_give_the_same_logits() {
    let model = Llama::load(&smollm2_gguf(), Precision::Quantized).unwrap();
    let fx = fixtures();
    let a = ids(&fx[0]["prompt_ids"]);
    let b = ids(&fx[1]["prompt_ids"]);
    // Alone, whole prompt at once.
    let mut ca = KvCache::new(&model.cfg);
    let alone = model.forward(&mut [Chunk { cache: &mut ca, tokens: &a, all_logits: false }]).unwrap();
    // Together with another sequence, the prompt split in two calls.
    let (mut ca2, mut cb) = (KvCache::new(&model.cfg), KvCache::new(&model.cfg));
    let split = a.len() / 2;
    model
        .forward(&mut [
            Chunk { cache: &mut ca2, tokens: &a[..split], all_logits: false },
            Chunk { cache: &mut cb, tokens: &b, all_logits: false },
        ])
        .unwrap();
    let together = model.forward(&mut [Chunk { cache: &mut ca2, tokens: &a[split..], all_logits: false }]).unwrap();
    assert_eq!(argmax(&alone[0]), argmax(&together[0]));
    let max_diff = alone[0].iter().zip(&together[0]).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(max_diff < 1e-3, "logits differ by {max_diff}");
}


#[test]
fn a_panic_inside_the_engine_fails_only_its_request() {
    use server::engine::scheduler::{Job, Scheduler};
    let model = Llama::load(&smollm2_gguf(), Precision::Quantized).unwrap();
    let sched = Scheduler::start(model, 4);
    let prompt = ids(&fixtures()[0]["prompt_ids"]);
    let submit = |stop_check: Option<Box<dyn Fn(&[u32]) -> bool + Send>>| {
        let (reply, rx) = tokio::sync::oneshot::channel();
        sched.submit(Job { prompt: prompt.clone(), max_new_tokens: 8, stop_ids: vec![2], stop_check, reply }).unwrap();
        rx
    };
    let bad = submit(Some(Box::new(|_: &[u32]| -> bool { panic!("boom") })));
    let good = submit(None);
    let bad = bad.blocking_recv().unwrap();
    assert!(bad.unwrap_err().contains("panicked"));
    let good = good.blocking_recv().unwrap().unwrap();
    assert_eq!(good.ids.len(), 8);
    // The engine thread is still serving.
    let again = submit(None).blocking_recv().unwrap().unwrap();
    assert_eq!(again.ids, good.ids);
}
