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
        sched.submit(Job { prompt: prompt.clone(), max_new_tokens: 8, stop_ids: vec![2], stop_check, top_k: 0, score: None, reply }).unwrap();
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

/// Soft labels from the engine: at every answer position the emitted token is the top-1, the
/// log-probabilities are ≤ 0, sorted, their mass ≤ 1, and they equal a log-softmax computed
/// here over the full logits of a teacher-forced pass over prompt + answer (to 1e-4).
#[test]
fn soft_labels_are_exact_log_probabilities_of_the_greedy_answer() {
    use server::engine::scheduler::{Job, Scheduler};
    let prompt = ids(&fixtures()[0]["prompt_ids"]);
    for precision in [Precision::Quantized, Precision::F32] {
        let sched = Scheduler::start(Llama::load(&smollm2_gguf(), precision).unwrap(), 4);
        let (reply, rx) = tokio::sync::oneshot::channel();
        sched.submit(Job { prompt: prompt.clone(), max_new_tokens: 24, stop_ids: vec![2], stop_check: None, top_k: 20, score: None, reply }).unwrap();
        let g = rx.blocking_recv().unwrap().unwrap();
        assert_eq!(g.soft_labels.len(), g.ids.len());
        let model = Llama::load(&smollm2_gguf(), precision).unwrap();
        let full: Vec<u32> = prompt.iter().chain(&g.ids).copied().collect();
        let mut cache = KvCache::new(&model.cfg);
        let all = model.forward(&mut [Chunk { cache: &mut cache, tokens: &full, all_logits: true }]).unwrap().remove(0);
        let v = model.cfg.vocab;
        let mut worst = 0f64;
        for (i, (pos, &id)) in g.soft_labels.iter().zip(&g.ids).enumerate() {
            assert_eq!(pos.top.len(), 20);
            assert_eq!(pos.top[0].0, id, "position {i}: the greedy token is the top-1");
            assert_eq!(pos.chosen_logprob, pos.top[0].1);
            assert!(pos.top.windows(2).all(|w| w[0].1 >= w[1].1) && pos.top[0].1 <= 0.0);
            assert!(pos.top.iter().map(|t| (t.1 as f64).exp()).sum::<f64>() <= 1.0 + 1e-6);
            // The logits that predicted answer token i: row prompt.len() - 1 + i.
            let row = &all[(prompt.len() - 1 + i) * v..(prompt.len() + i) * v];
            let lse = row.iter().map(|x| (*x as f64).exp()).sum::<f64>().ln();
            for &(tid, lp) in &pos.top {
                worst = worst.max((lp as f64 - (row[tid as usize] as f64 - lse)).abs());
            }
        }
        eprintln!("{precision:?}: soft labels vs teacher-forced log-softmax, worst |Δ| {worst:.2e} over {} positions", g.ids.len());
        assert!(worst < 1e-4, "{precision:?}: {worst}");
    }
}

/// Re-scoring by teacher forcing: an answer the model would not have given is scored in one
/// pass, and every position equals a log-softmax over that position's logits computed here
/// (one token at a time through the cache, a different code path); the greedy answer scored
/// this way gives back the soft labels recorded while decoding it.
#[test]
fn scoring_a_given_answer_equals_step_by_step_log_softmax() {
    use server::engine::scheduler::{Job, Scheduler};
    let prompt = ids(&fixtures()[0]["prompt_ids"]);
    let model = Llama::load(&smollm2_gguf(), Precision::F32).unwrap();
    let v = model.cfg.vocab;
    let sched = Scheduler::start(Llama::load(&smollm2_gguf(), Precision::F32).unwrap(), 4);
    let run = |score: Option<Vec<u32>>| {
        let (reply, rx) = tokio::sync::oneshot::channel();
        sched.submit(Job { prompt: prompt.clone(), max_new_tokens: 16, stop_ids: vec![2], stop_check: None, top_k: 8, score, reply }).unwrap();
        rx.blocking_recv().unwrap().unwrap()
    };
    let greedy = run(None);
    // Not the model's answer: its greedy answer reversed.
    let given: Vec<u32> = greedy.ids.iter().rev().copied().collect();
    let scored = run(Some(given.clone()));
    assert_eq!(scored.ids, given);
    assert_eq!(scored.soft_labels.len(), given.len());
    let mut cache = KvCache::new(&model.cfg);
    let mut last = model.forward(&mut [Chunk { cache: &mut cache, tokens: &prompt, all_logits: false }]).unwrap().remove(0);
    let mut worst = 0f64;
    for (i, (&id, pos)) in given.iter().zip(&scored.soft_labels).enumerate() {
        let lse = last.iter().map(|x| (*x as f64).exp()).sum::<f64>().ln();
        worst = worst.max((pos.chosen_logprob as f64 - (last[id as usize] as f64 - lse)).abs());
        let want = server::engine::logprobs::top_k(&last, 8, id);
        let got: Vec<u32> = pos.top.iter().map(|t| t.0).collect();
        let want_ids: Vec<u32> = want.top.iter().map(|t| t.0).collect();
        assert_eq!(got, want_ids, "position {i}");
        for (&(_, a), &(_, b)) in pos.top.iter().zip(&want.top) {
            worst = worst.max((a - b).abs() as f64);
        }
        last = model.forward(&mut [Chunk { cache: &mut cache, tokens: &[id], all_logits: false }]).unwrap().remove(0);
        assert_eq!(last.len(), v);
    }
    eprintln!("scored answer vs step-by-step log-softmax: worst |Δ| {worst:.2e} over {} positions", given.len());
    assert!(worst < 1e-4, "{worst}");
    // The greedy answer, scored, gives back what decoding recorded.
    let again = run(Some(greedy.ids.clone()));
    assert_eq!(again.finish, greedy.finish);
    for (a, b) in again.soft_labels.iter().zip(&greedy.soft_labels) {
        assert_eq!(a.top.iter().map(|t| t.0).collect::<Vec<_>>(), b.top.iter().map(|t| t.0).collect::<Vec<_>>());
        assert!((a.chosen_logprob - b.chosen_logprob).abs() < 1e-4);
    }
    let empty = {
        let (reply, rx) = tokio::sync::oneshot::channel();
        sched.submit(Job { prompt: prompt.clone(), max_new_tokens: 16, stop_ids: vec![2], stop_check: None, top_k: 8, score: Some(vec![]), reply }).unwrap();
        rx.blocking_recv().unwrap()
    };
    assert!(empty.unwrap_err().contains("no tokens"));
}
