//! The train/validation split (deterministic, by prompt hash, default 5 % with a minimum), soft
//! labels carried through packing onto the right targets, and the checkpoint's crash safety (a
//! save killed before its rename leaves the previous one).

use candle_core::{Device, Tensor};
use trainer::checkpoint::{load, save, State};
use server::soft_labels::Position;
use trainer::data::{pack, split, Example};

fn examples(n: usize) -> Vec<Example> {
    (0..n as i64)
        .map(|i| Example {
            generation_id: i,
            prompt: vec![1, i as u32],
            answer: vec![2],
            // A spread of hashes as sha256 gives them.
            split_hash: (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            soft_labels: None,
        })
        .collect()
}

fn ids(v: &[Example]) -> Vec<i64> {
    v.iter().map(|e| e.generation_id).collect()
}

#[test]
fn split_is_deterministic_by_hash_with_a_minimum() {
    let (train, val) = split(examples(1000), 0.05, 4).unwrap();
    assert_eq!(train.len() + val.len(), 1000);
    // ~5 % by hash (the threshold is 5 % of the hash range).
    assert!((40..=60).contains(&val.len()), "{} validation examples", val.len());
    let threshold = (0.05 * u64::MAX as f64) as u64;
    assert!(val.iter().all(|e| e.split_hash < threshold) && train.iter().all(|e| e.split_hash >= threshold));
    // The input order does not matter.
    let mut shuffled = examples(1000);
    shuffled.reverse();
    let (train2, val2) = split(shuffled, 0.05, 4).unwrap();
    assert_eq!((ids(&train), ids(&val)), (ids(&train2), ids(&val2)));
    // Small sets still get the minimum, and always keep one example to train on.
    let (train, val) = split(examples(20), 0.05, 4).unwrap();
    assert_eq!((train.len(), val.len()), (16, 4));
    let (train, val) = split(examples(3), 0.05, 4).unwrap();
    assert_eq!((train.len(), val.len()), (1, 2));
    assert!(split(examples(1), 0.05, 4).unwrap_err().to_string().contains("need at least 2"));
}

/// An example whose soft labels name, at answer position j, the ids 1000·(j+1) + 0..k.
fn soft_example(id: i64, prompt: usize, answer: usize, k: usize) -> Example {
    let soft = (0..answer)
        .map(|j| Position {
            chosen_logprob: -0.5,
            top: (0..k).map(|c| ((1000 * (j + 1) + c) as u32, -(c as f32) - 0.25)).collect(),
        })
        .collect();
    Example {
        generation_id: id,
        prompt: (0..prompt as u32).map(|t| 10 + t).collect(),
        answer: (0..answer as u32).map(|t| 500 + t).collect(),
        split_hash: id as u64,
        soft_labels: Some(soft),
    }
}

#[test]
fn packing_puts_each_answer_tokens_soft_labels_on_the_target_that_predicts_it() {
    // Two examples in one row (the second with a smaller k, padded), one truncated by max_len.
    let a = soft_example(1, 3, 4, 3);
    let b = soft_example(2, 2, 3, 2);
    let c = soft_example(3, 5, 10, 3);
    let batches = pack(&[&a, &b, &c], 12, 2);
    assert_eq!(batches.len(), 1);
    let bt = &batches[0];
    assert_eq!(bt.k, 3);
    assert_eq!(bt.teacher_ids.len(), bt.rows * bt.len * 3);
    let mut checked = 0;
    for i in 0..bt.rows * bt.len {
        let row = &bt.teacher_ids[i * 3..i * 3 + 3];
        let lps = &bt.teacher_logprobs[i * 3..i * 3 + 3];
        if bt.mask[i] == 0.0 {
            assert!(lps.iter().all(|l| *l == f32::NEG_INFINITY), "position {i}: a prompt or pad target has soft labels");
            continue;
        }
        // The target is answer token 500 + j: its soft labels are position j's.
        let j = (bt.target[i] - 500) as usize;
        assert_eq!(row[0] as usize, 1000 * (j + 1), "position {i}");
        assert_eq!(lps[0], -0.25);
        if bt.segments[i] == 2 && i < bt.len {
            // Example b has k = 2: the third pair is padding with no teacher mass.
            assert_eq!(lps[2], f32::NEG_INFINITY);
        }
        checked += 1;
    }
    assert_eq!(checked, bt.loss_tokens);
    // a: 4, b: 3, c: cut to 13 tokens (12 targets), of which 8 are answer tokens.
    assert_eq!(bt.loss_tokens, 4 + 3 + 8);
}

#[test]
fn a_save_killed_before_its_rename_leaves_the_previous_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.safetensors");
    let state = |step| State { step, epoch: 0, batch_in_epoch: step, fingerprint: "f".into(), tokens: 10 * step };
    let w = |v: f32| vec![("model.w".to_string(), Tensor::new(&[v, v + 1.0], &Device::Cpu).unwrap())];
    save(&path, &w(1.0), &state(1)).unwrap();
    // What a process killed mid-save leaves: a partial temporary file next to the checkpoint.
    let tmp = path.with_extension("safetensors.tmp");
    std::fs::write(&tmp, b"\x10\x00\x00\x00partial").unwrap();
    let (t, s) = load(&path, &Device::Cpu).unwrap();
    assert_eq!(s, state(1));
    assert_eq!(t["model.w"].to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
    // The next save replaces the leftover and the checkpoint.
    save(&path, &w(5.0), &state(2)).unwrap();
    let (t, s) = load(&path, &Device::Cpu).unwrap();
    assert_eq!((s.step, t["model.w"].to_vec1::<f32>().unwrap()), (2, vec![5.0, 6.0]));
    assert!(!tmp.exists());
}

/// KD on answers from an OpenAI-compatible teacher: the server reported answer ids and soft
/// labels but no prompt ids and no end-of-turn token. The student (same tokenizer) keeps the
/// teacher's answer ids, renders the prompt itself, appends the end-of-turn token with no soft
/// label; answer ids its tokenizer does not spell as the answer are refused for KD.
#[test]
fn kd_on_an_openai_teachers_answers_keeps_its_ids_and_adds_an_unlabelled_end_of_turn() {
    use server::model::chat_template::ChatTemplate;
    use trainer::data::{Encoder, Record};
    let gguf = distill_tests::harness::smollm2_gguf();
    let tok = trainer::init::tokenizer_from(&gguf).unwrap();
    let t = &tok.tokenizer;
    let template = ChatTemplate::new(tok.template.as_deref().unwrap(), &t.token_text(t.special.bos), &t.token_text(Some(t.special.eos))).unwrap();
    let text = "The capital of France is Paris.";
    let ids = t.encode(text, false).unwrap();
    let soft: Vec<Position> = ids.iter().map(|&id| Position { chosen_logprob: -0.25, top: vec![(id, -0.25), (7, -2.0)] }).collect();
    let record = |completion: Vec<u32>| Record {
        generation_id: 1,
        job_id: 1,
        endpoint: "chat".into(),
        request: r#"[{"role":"user","content":"Capital of France?"}]"#.into(),
        text: text.into(),
        finish_reason: Some("stop".into()),
        prompt_token_ids: None,
        completion_token_ids: Some(completion),
        teacher_identity: "openai:http://h/v1#m".into(),
        soft_labels: Some(server::soft_labels::encode(&soft).unwrap()),
    };
    let enc = Encoder { tokenizer: t, template: &template, use_teacher_ids: true, soft_labels: true };
    let (ex, _) = enc.encode(&[record(ids.clone())]).unwrap();
    let e = &ex[0];
    assert_eq!(&e.answer[..ids.len()], &ids[..]);
    assert_eq!(e.answer.last(), Some(&t.special.eos));
    let labels = e.soft_labels.as_ref().unwrap();
    assert_eq!(labels.len(), e.answer.len());
    assert_eq!(labels[0].top[0], (ids[0], -0.25));
    assert!(labels.last().unwrap().top.iter().all(|p| p.1 == f32::NEG_INFINITY), "the end-of-turn token has no soft label");
    assert_eq!(e.prompt, enc.render_prompt(&record(ids.clone())).unwrap());
    // Ids that do not spell the answer (another vocabulary): no KD.
    let other: Vec<u32> = ids.iter().map(|i| i + 1).collect();
    let err = enc.encode(&[record(other)]).unwrap_err().to_string();
    assert!(err.contains("does not reproduce the teacher's token ids"), "{err}");
}
