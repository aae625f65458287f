//! The train/validation split (deterministic, by prompt hash, default 5 % with a minimum) and
//! the checkpoint's crash safety (a save killed before its rename leaves the previous one).

use candle_core::{Device, Tensor};
use trainer::checkpoint::{load, save, State};
use trainer::data::{split, Example};

fn examples(n: usize) -> Vec<Example> {
    (0..n as i64)
        .map(|i| Example {
            generation_id: i,
            prompt: vec![1, i as u32],
            answer: vec![2],
            // A spread of hashes as sha256 gives them.
            split_hash: (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
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
