//! The fused attention softmax and cross-entropy against the composed candle ops they replace
//! (values and gradients, f32 and f64), their gradients against finite differences in f64,
//! and the edge cases: rows with no allowed position, masked tokens, weighted tokens,
//! extreme logits, bad target ids.

use candle_core::{DType, Device, Tensor, Var};
use trainer::ops::{composed, masked_softmax, masked_token_ce};

fn noise(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn tensor(v: Vec<f64>, shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// A packed-causal bias [B, 1, T, T] (two segments in row 0, one in row 1) and, in row 1, a
/// query row with nothing allowed (all −∞).
fn bias(b: usize, t: usize, dtype: DType) -> Tensor {
    let mut v = vec![f64::NEG_INFINITY; b * t * t];
    for bi in 0..b {
        for i in 0..t {
            for j in 0..=i {
                let same = bi == 1 || (i < t / 2) == (j < t / 2);
                if same && !(bi == 1 && i == t - 1) {
                    v[(bi * t + i) * t + j] = 0.0;
                }
            }
        }
    }
    tensor(v, &[b, 1, t, t], dtype)
}

/// Weighted sum of the output (fixed random weights), so every output element's gradient matters.
fn weighted(y: &Tensor, seed: u64) -> Tensor {
    let w = tensor(noise(seed, y.elem_count(), 1.0), y.dims(), y.dtype());
    (y * w).unwrap().sum_all().unwrap()
}

#[test]
fn fused_softmax_equals_composed_and_its_gradient() {
    let (b, h, t) = (2, 3, 8);
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        let x = Var::from_tensor(&tensor(noise(1, b * h * t * t, 4.0), &[b, h, t, t], dtype)).unwrap();
        let bias = bias(b, t, dtype);
        let fused = masked_softmax(x.as_tensor(), &bias, 0.35).unwrap();
        let reference = composed::masked_softmax(x.as_tensor(), &bias, 0.35).unwrap();
        // The composed softmax gives NaN on the row with nothing allowed; the fused one zeros.
        let (f, r) = (values(&fused), values(&reference));
        let row = |i: usize| (i / t) % t == t - 1 && i / (h * t * t) == 1;
        for (i, (a, c)) in f.iter().zip(&r).enumerate() {
            if row(i) {
                assert_eq!(*a, 0.0, "empty row must give zeros");
            } else {
                assert!((a - c).abs() <= tol, "{dtype:?} at {i}: {a} vs {c}");
            }
        }
        // Gradients, with the empty row's weights zeroed on the reference side (its NaNs).
        let gf = weighted(&fused, 2).backward().unwrap();
        let keep = tensor((0..f.len()).map(|i| if row(i) { 0.0 } else { 1.0 }).collect(), fused.dims(), dtype);
        let safe = keep.ne(0.0).unwrap().where_cond(&reference, &keep.zeros_like().unwrap()).unwrap();
        let gr = weighted(&safe, 2).backward().unwrap();
        let (a, c) = (values(gf.get(&x).unwrap()), values(gr.get(&x).unwrap()));
        for (i, (a, c)) in a.iter().zip(&c).enumerate() {
            if !row(i) {
                assert!((a - c).abs() <= tol * 10.0, "{dtype:?} grad at {i}: {a} vs {c}");
            }
        }
    }
}

#[test]
fn fused_cross_entropy_equals_composed_and_its_gradient() {
    let (b, t, v) = (2, 5, 37);
    let targets = Tensor::from_vec((0..(b * t) as u32).map(|i| (i * 7) % v as u32).collect::<Vec<_>>(), (b, t), &Device::Cpu).unwrap();
    // Masked, weighted and ordinary tokens.
    let mask_vals: Vec<f64> = (0..b * t).map(|i| [1.0, 0.0, 0.5, 1.0, 2.0][i % 5]).collect();
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-6)] {
        let mask = tensor(mask_vals.clone(), &[b, t], dtype);
        // Extreme logits in one row (±80 overflows a naive exp in f32).
        let mut lv = noise(3, b * t * v, 3.0);
        lv[..v].iter_mut().enumerate().for_each(|(i, x)| *x = if i % 2 == 0 { 80.0 } else { -80.0 });
        let x = Var::from_tensor(&tensor(lv, &[b, t, v], dtype)).unwrap();
        let fused = masked_token_ce(x.as_tensor(), &targets, &mask).unwrap();
        let reference = composed::masked_token_ce(x.as_tensor(), &targets, &mask).unwrap();
        assert_eq!(fused.dims(), &[b, t]);
        let (f, r) = (values(&fused), values(&reference));
        assert!(f.iter().all(|x| x.is_finite()), "{f:?}");
        assert!(max_rel(&f, &r) <= tol, "{dtype:?}: {f:?} vs {r:?}");
        for (i, m) in mask_vals.iter().enumerate() {
            if *m == 0.0 {
                assert_eq!(f[i], 0.0);
            }
        }
        let gf = weighted(&fused, 4).backward().unwrap();
        let gr = weighted(&reference, 4).backward().unwrap();
        let (a, c) = (values(gf.get(&x).unwrap()), values(gr.get(&x).unwrap()));
        assert!(max_rel(&a, &c) <= tol * 10.0, "{dtype:?} gradient differs by {}", max_rel(&a, &c));
    }
}

/// Central differences in f64 against the fused ops' backward.
fn finite_difference_check(f: &dyn Fn(&Tensor) -> Tensor, x0: Vec<f64>, shape: &[usize]) -> f64 {
    let x = Var::from_tensor(&tensor(x0.clone(), shape, DType::F64)).unwrap();
    let g = values(f(x.as_tensor()).backward().unwrap().get(&x).unwrap());
    let eps = 1e-6;
    let mut worst = 0f64;
    for i in (0..x0.len()).step_by(3) {
        let at = |d: f64| {
            let mut v = x0.clone();
            v[i] += d;
            f(&tensor(v, shape, DType::F64)).to_scalar::<f64>().unwrap()
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        let err = (fd - g[i]).abs() / (fd.abs().max(g[i].abs()).max(1e-3));
        worst = worst.max(err);
    }
    worst
}

#[test]
fn fused_gradients_match_finite_differences() {
    let (b, h, t) = (2, 2, 6);
    let bias = bias(b, t, DType::F64);
    let soft = |x: &Tensor| weighted(&masked_softmax(x, &bias, 0.5).unwrap(), 5);
    let e1 = finite_difference_check(&soft, noise(6, b * h * t * t, 3.0), &[b, h, t, t]);
    let (bb, tt, v) = (2, 3, 11);
    let targets = Tensor::from_vec(vec![0u32, 3, 10, 5, 5, 1], (bb, tt), &Device::Cpu).unwrap();
    let mask = tensor(vec![1.0, 0.0, 0.7, 1.0, 1.0, 2.0], &[bb, tt], DType::F64);
    let ce = |x: &Tensor| weighted(&masked_token_ce(x, &targets, &mask).unwrap(), 7);
    let e2 = finite_difference_check(&ce, noise(8, bb * tt * v, 3.0), &[bb, tt, v]);
    eprintln!("finite differences: softmax worst rel. error {e1:.2e}, cross-entropy {e2:.2e}");
    assert!(e1 < 1e-6 && e2 < 1e-6, "softmax {e1}, cross-entropy {e2}");
}

#[test]
fn fused_cross_entropy_refuses_a_target_outside_the_vocabulary() {
    let x = Tensor::zeros((1, 2, 4), DType::F32, &Device::Cpu).unwrap();
    let targets = Tensor::from_vec(vec![1u32, 4], (1, 2), &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, 2), DType::F32, &Device::Cpu).unwrap();
    let err = masked_token_ce(&x, &targets, &mask).unwrap_err().to_string();
    assert!(err.contains("target id 4 is outside the vocabulary of 4"), "{err}");
}

#[test]
fn fused_rope_heads_equals_composed_and_its_gradient() {
    use trainer::ops::rope_heads;
    let (b, t, n, d) = (2, 5, 3, 8);
    // HF tables: the same angle in both halves.
    let angles: Vec<f64> = (0..b * t).flat_map(|r| (0..d).map(move |i| (r % t) as f64 * 0.7 / (1.0 + (i % (d / 2)) as f64))).collect();
    for (dtype, tol) in [(DType::F64, 1e-13), (DType::F32, 1e-5)] {
        let cos = tensor(angles.iter().map(|a| a.cos()).collect(), &[b, 1, t, d], dtype);
        let sin = tensor(angles.iter().map(|a| a.sin()).collect(), &[b, 1, t, d], dtype);
        let x = Var::from_tensor(&tensor(noise(9, b * t * n * d, 2.0), &[b * t, n * d], dtype)).unwrap();
        let fused = rope_heads(x.as_tensor(), (b, t, n, d), &cos, &sin).unwrap();
        let reference = composed::rope_heads(x.as_tensor(), (b, t, n, d), &cos, &sin).unwrap();
        assert_eq!(fused.dims(), &[b, n, t, d]);
        assert!(max_rel(&values(&fused), &values(&reference)) <= tol);
        let gf = weighted(&fused, 10).backward().unwrap();
        let gr = weighted(&reference, 10).backward().unwrap();
        assert!(max_rel(&values(gf.get(&x).unwrap()), &values(gr.get(&x).unwrap())) <= tol, "{dtype:?} gradient");
        if dtype == DType::F64 {
            let f = |x: &Tensor| weighted(&rope_heads(x, (b, t, n, d), &cos, &sin).unwrap(), 11);
            let e = finite_difference_check(&f, noise(12, b * t * n * d, 2.0), &[b * t, n * d]);
            assert!(e < 1e-6, "finite differences: {e}");
        }
    }
}

#[test]
fn fused_attention_probs_equal_product_then_softmax() {
    use trainer::ops::{attention_probs, attention_values};
    let (b, h, kv, t, d) = (2, 6, 2, 8, 4);
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        let q = Var::from_tensor(&tensor(noise(13, b * h * t * d, 1.5), &[b, h, t, d], dtype)).unwrap();
        let k = Var::from_tensor(&tensor(noise(14, b * kv * t * d, 1.5), &[b, kv, t, d], dtype)).unwrap();
        let v = Var::from_tensor(&tensor(noise(26, b * kv * t * d, 1.5), &[b, kv, t, d], dtype)).unwrap();
        // Every row has an allowed position (the row with none is covered above).
        let bias = {
            let full = bias(b, t, DType::F64);
            let v: Vec<f64> = values(&full).iter().enumerate().map(|(i, x)| if i % (t * t) == t * t - 1 { 0.0 } else { *x }).collect();
            tensor(v, &[b, 1, t, t], dtype)
        };
        // Reference: HF's repeat_kv (each KV head repeated for its h / kv query heads), then
        // the product, the softmax and the product with the values.
        let repeat = |x: &Tensor| x.unsqueeze(2).unwrap().broadcast_as((b, kv, h / kv, t, d)).unwrap().reshape((b, h, t, d)).unwrap();
        let fused = attention_values(&attention_probs(q.as_tensor(), k.as_tensor(), &bias, 0.5).unwrap(), v.as_tensor()).unwrap();
        let scores = q.as_tensor().matmul(&repeat(k.as_tensor()).t().unwrap()).unwrap();
        let reference = composed::masked_softmax(&scores, &bias, 0.5).unwrap().matmul(&repeat(v.as_tensor())).unwrap();
        assert_eq!(fused.dims(), &[b, h, t, d]);
        assert!(max_rel(&values(&fused), &values(&reference)) <= tol);
        let gf = weighted(&fused, 15).backward().unwrap();
        let gr = weighted(&reference, 15).backward().unwrap();
        for x in [&q, &k, &v] {
            let e = max_rel(&values(gf.get(x).unwrap()), &values(gr.get(x).unwrap()));
            assert!(e <= tol * 10.0, "{dtype:?} gradient differs by {e}");
        }
    }
}

#[test]
fn fused_silu_mul_and_rms_norm_equal_composed_and_their_gradients() {
    use trainer::ops::{rms_norm, silu_mul};
    let (n, h) = (7, 12);
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        let a = Var::from_tensor(&tensor(noise(16, n * h, 4.0), &[n, h], dtype)).unwrap();
        let b = Var::from_tensor(&tensor(noise(17, n * h, 2.0), &[n, h], dtype)).unwrap();
        let w = Var::from_tensor(&tensor(noise(18, h, 1.0).iter().map(|x| 1.0 + 0.5 * x).collect(), &[h], dtype)).unwrap();
        let cases: [(&str, Tensor, Tensor, Vec<&Var>); 2] = [
            ("silu_mul", silu_mul(&a, &b).unwrap(), composed::silu_mul(&a, &b).unwrap(), vec![&a, &b]),
            ("rms_norm", rms_norm(&a, &w, 1e-5).unwrap(), composed::rms_norm(&a, &w, 1e-5).unwrap(), vec![&a, &w]),
        ];
        for (name, fused, reference, vars) in cases {
            assert!(max_rel(&values(&fused), &values(&reference)) <= tol, "{name} {dtype:?}");
            let gf = weighted(&fused, 19).backward().unwrap();
            let gr = weighted(&reference, 19).backward().unwrap();
            for v in vars {
                let e = max_rel(&values(gf.get(v).unwrap()), &values(gr.get(v).unwrap()));
                assert!(e <= tol * 10.0, "{name} {dtype:?} gradient differs by {e}");
            }
        }
    }
    let wv = tensor(noise(20, h, 1.0).iter().map(|x| 1.0 + 0.5 * x).collect(), &[h], DType::F64);
    let f = |x: &Tensor| weighted(&rms_norm(x, &wv, 1e-5).unwrap(), 21);
    let e = finite_difference_check(&f, noise(22, n * h, 3.0), &[n, h]);
    let u = tensor(noise(23, n * h, 2.0), &[n, h], DType::F64);
    let g = |x: &Tensor| weighted(&silu_mul(x, &u).unwrap(), 24);
    let e2 = finite_difference_check(&g, noise(25, n * h, 4.0), &[n, h]);
    assert!(e < 1e-6 && e2 < 1e-6, "finite differences: rms_norm {e}, silu_mul {e2}");
}
