//! Exact log-probabilities from raw logits, for soft labels: the teacher's distribution at
//! temperature 1 (before any sampling transform), natural log, whatever token was emitted.

use crate::soft_labels::Position;

/// `log softmax(logits)` at `chosen` and at the `k` most likely tokens (highest first; equal
/// logits by lower id). The normaliser `max + ln Σ exp(x − max)` is summed in f64, so each
/// value is exact to f32 rounding of the logits. O(vocabulary): a selection, then a sort of k.
pub fn top_k(logits: &[f32], k: usize, chosen: u32) -> Position {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let norm = max + sum.ln();
    let lp = |id: u32| (logits[id as usize] as f64 - norm) as f32;
    let k = k.min(logits.len());
    let order = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    if k < ids.len() && k > 0 {
        ids.select_nth_unstable_by(k - 1, order);
    }
    ids.truncate(k);
    ids.sort_by(order);
    // A log-probability is ≤ 0; rounding of a dominant logit could give +1e-8.
    let clamp = |v: f32| v.min(0.0);
    Position { chosen_logprob: clamp(lp(chosen)), top: ids.into_iter().map(|id| (id, clamp(lp(id)))).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 30.0 - 15.0) as f32
            })
            .collect()
    }

    /// Independent reference: a full sort and a log-softmax over all logits in f64.
    fn reference(x: &[f32], k: usize) -> Vec<(u32, f64)> {
        let lse = x.iter().map(|v| (*v as f64).exp()).sum::<f64>().ln();
        let mut all: Vec<(u32, f64)> = x.iter().enumerate().map(|(i, v)| (i as u32, *v as f64 - lse)).collect();
        all.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
        all.truncate(k);
        all
    }

    #[test]
    fn top_k_equals_a_full_log_softmax() {
        for (seed, v, k) in [(1, 49_152, 20), (2, 1000, 1), (3, 50, 50), (4, 50, 80)] {
            let x = logits(seed, v);
            let p = top_k(&x, k, 7);
            let want = reference(&x, k);
            assert_eq!(p.top.len(), want.len());
            for ((id, lp), (wid, wlp)) in p.top.iter().zip(&want) {
                assert_eq!(id, wid);
                assert!((*lp as f64 - wlp).abs() < 1e-4, "{lp} vs {wlp}");
                assert!(*lp <= 0.0);
            }
            assert!(p.top.windows(2).all(|w| w[0].1 >= w[1].1));
            assert_eq!(p.top[0].0, crate::engine::llama::argmax(&x));
            let mass: f64 = p.top.iter().map(|(_, lp)| (*lp as f64).exp()).sum();
            assert!(mass <= 1.0 + 1e-6, "{mass}");
            let lse = x.iter().map(|v| (*v as f64).exp()).sum::<f64>().ln();
            assert!((p.chosen_logprob as f64 - (x[7] as f64 - lse)).abs() < 1e-4);
        }
    }

    #[test]
    fn ties_and_extremes() {
        // Equal logits: lower id first; a dominant logit gives log-probability 0, not > 0.
        let p = top_k(&[1.0, 3.0, 3.0, -1.0], 3, 0);
        assert_eq!(p.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2, 0]);
        let p = top_k(&[1000.0, 0.0, f32::NEG_INFINITY], 3, 2);
        assert_eq!(p.top[0], (0, 0.0));
        assert_eq!(p.top[2], (2, f32::NEG_INFINITY));
        assert_eq!(p.chosen_logprob, f32::NEG_INFINITY);
        assert!(top_k(&[0.5, 0.1], 0, 1).top.is_empty());
    }
}
