//! AdamW against a hand-computed reference, bit-identical resume, the lr schedule, gradient
//! clipping and accumulation, and a short training run whose loss must fall.

use candle_core::{DType, Device, Tensor, Var};
use server::model::hf::HfLlamaConfig;
use trainer::model::{masked_cross_entropy, Llama};
use trainer::optim::{accumulate_grads, clip_grad_norm, grad_norm, lr_at, AdamW, AdamWConfig, LR_FLOOR_FRACTION};

fn tiny_cfg() -> HfLlamaConfig {
    serde_json::from_value(serde_json::json!({
        "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32,
        "tie_word_embeddings": true,
    }))
    .unwrap()
}

fn u32s(rows: &[&[u32]]) -> Tensor {
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
}

/// Summed loss and token count over the given rows of a fixed packed batch.
fn loss_rows(model: &Llama, rows: std::ops::Range<usize>) -> (Tensor, f64) {
    let input = u32s(&[&[3, 7, 1, 9, 4, 2, 6, 6], &[5, 5, 8, 30, 11, 12, 13, 0]]);
    let positions = u32s(&[&[0, 1, 2, 3, 0, 1, 2, 3], &[0, 1, 2, 3, 4, 5, 6, 0]]);
    let segments = u32s(&[&[1, 1, 1, 1, 2, 2, 2, 2], &[1, 1, 1, 1, 1, 1, 1, 0]]);
    let targets = u32s(&[&[7, 1, 9, 0, 2, 6, 6, 0], &[5, 8, 30, 11, 12, 13, 0, 0]]);
    let mask: Vec<f32> = vec![1., 1., 1., 0., 1., 1., 1., 0., 1., 1., 1., 1., 1., 1., 0., 0.];
    let mask = Tensor::from_vec(mask, (2, 8), &Device::Cpu).unwrap().to_dtype(model.dtype()).unwrap();
    let n = rows.len();
    let pick = |t: &Tensor| t.narrow(0, rows.start, n).unwrap();
    let logits = model.forward(&pick(&input), &pick(&positions), &pick(&segments)).unwrap();
    masked_cross_entropy(&logits, &pick(&targets), &pick(&mask)).unwrap()
}

fn vals(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn adamw_matches_hand_computed_reference() {
    let dev = Device::Cpu;
    let w0 = [0.5, -1.0, 2.0, 0.0, 0.25, -0.75];
    let b0 = [1.0, -2.0, 0.5];
    let w = Var::from_tensor(&Tensor::from_vec(w0.to_vec(), (2, 3), &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::from_vec(b0.to_vec(), 3, &dev).unwrap()).unwrap();
    let params = vec![("b".to_string(), b.clone()), ("w".to_string(), w.clone())];
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
    let mut opt = AdamW::new(cfg);
    // d/dθ Σ θ·G = G: the gradients of each step are exactly these.
    let gw = [[0.1, -0.2, 0.3, 0.0, 1.5, -0.05], [-0.3, 0.1, 0.2, 0.4, -1.0, 0.05], [0.2, 0.2, -0.1, 0.1, 0.5, 0.0]];
    let gb = [[0.5, -0.5, 0.1], [0.2, 0.3, -0.4], [-0.1, 0.0, 0.6]];
    let lrs = [0.1, 0.05, 0.02];

    // Reference, element by element, straight from the AdamW paper / torch docs.
    let (mut rw, mut rb) = (w0.to_vec(), b0.to_vec());
    let (mut mw, mut vw, mut mb, mut vb) = (vec![0.0; 6], vec![0.0; 6], vec![0.0; 3], vec![0.0; 3]);
    let reference = |p: &mut [f64], m: &mut [f64], v: &mut [f64], g: &[f64], lr: f64, t: i32, decay: bool| {
        for i in 0..p.len() {
            if decay {
                p[i] -= lr * 0.1 * p[i];
            }
            m[i] = 0.9 * m[i] + 0.1 * g[i];
            v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
            let mhat = m[i] / (1.0 - 0.9f64.powi(t));
            let vhat = v[i] / (1.0 - 0.999f64.powi(t));
            p[i] -= lr * mhat / (vhat.sqrt() + 1e-8);
        }
    };
    for k in 0..3 {
        let gwt = Tensor::from_vec(gw[k].to_vec(), (2, 3), &dev).unwrap();
        let gbt = Tensor::from_vec(gb[k].to_vec(), 3, &dev).unwrap();
        let loss = ((w.as_tensor() * &gwt).unwrap().sum_all().unwrap() + (b.as_tensor() * &gbt).unwrap().sum_all().unwrap()).unwrap();
        opt.step(&params, &loss.backward().unwrap(), lrs[k]).unwrap();
        reference(&mut rw, &mut mw, &mut vw, &gw[k], lrs[k], k as i32 + 1, true);
        reference(&mut rb, &mut mb, &mut vb, &gb[k], lrs[k], k as i32 + 1, false);
        if k == 0 {
            // Step 1 by hand: m̂ = g, v̂ = g², so the step is lr·sign(g) (0 where g = 0).
            let expect_w: Vec<f64> = w0.iter().zip(&gw[0]).map(|(p, g)| p * (1.0 - 0.1 * 0.1) - 0.1 * g / (g.abs() + 1e-8)).collect();
            let expect_b: Vec<f64> = b0.iter().zip(&gb[0]).map(|(p, g)| p - 0.1 * g / (g.abs() + 1e-8)).collect();
            for (a, e) in vals(w.as_tensor()).iter().zip(&expect_w).chain(vals(b.as_tensor()).iter().zip(&expect_b)) {
                assert!((a - e).abs() < 1e-12, "step 1: {a} vs {e}");
            }
        }
        for (a, e) in vals(w.as_tensor()).iter().zip(&rw).chain(vals(b.as_tensor()).iter().zip(&rb)) {
            assert!((a - e).abs() < 1e-12, "step {}: {a} vs reference {e}", k + 1);
        }
    }
    assert_eq!(opt.steps_done(), 3);
    // The 1-D parameter is never decayed: with zero gradients only decay could move it.
    let before = vals(b.as_tensor());
    let zb = b.as_tensor().zeros_like().unwrap().detach();
    let zw = w.as_tensor().zeros_like().unwrap().detach();
    let loss = ((b.as_tensor() * zb).unwrap().sum_all().unwrap() + (w.as_tensor() * zw).unwrap().sum_all().unwrap()).unwrap();
    let w_before = vals(w.as_tensor());
    let mut o2 = AdamW::new(cfg);
    o2.step(&params, &loss.backward().unwrap(), 0.1).unwrap();
    assert_eq!(vals(b.as_tensor()), before, "1-D parameters must not be weight-decayed");
    for (a, e) in vals(w.as_tensor()).iter().zip(&w_before) {
        assert!((a - e * (1.0 - 0.1 * 0.1)).abs() < 1e-15, "matrices are decayed: {a} vs {e}");
    }
}

fn train(model: &Llama, opt: &mut AdamW, steps: u64, total: u64) -> Vec<f64> {
    let params = model.params();
    let mut losses = Vec::new();
    for _ in 0..steps {
        let (sum, count) = loss_rows(model, 0..2);
        let loss = (sum / count).unwrap();
        losses.push(loss.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap());
        let mut grads = loss.backward().unwrap();
        clip_grad_norm(&mut grads, &params, 1.0).unwrap();
        let lr = lr_at(opt.steps_done(), 1e-2, 3, total);
        opt.step(&params, &grads, lr).unwrap();
    }
    losses
}

fn snapshot(model: &Llama) -> Vec<(String, Vec<f32>)> {
    model.named_tensors().unwrap().into_iter().map(|t| (t.name, t.values)).collect()
}

#[test]
fn resume_from_saved_state_is_bit_identical() {
    let cfg = AdamWConfig { weight_decay: 0.1, ..AdamWConfig::default() };
    let model = Llama::random(tiny_cfg(), 5, DType::F32, &Device::Cpu).unwrap();
    let mut opt = AdamW::new(cfg);
    train(&model, &mut opt, 4, 10);

    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("optimizer.safetensors");
    opt.save(&state_file).unwrap();
    let saved_weights = model.named_tensors().unwrap();
    let state_map = opt.state_tensors().unwrap();

    let uninterrupted = train(&model, &mut opt, 6, 10);
    let expected = snapshot(&model);

    for from_file in [true, false] {
        let weights = saved_weights
            .iter()
            .map(|t| server::model::hf::NamedTensor { name: t.name.clone(), shape: t.shape.clone(), values: t.values.clone() })
            .collect();
        let resumed = Llama::from_tensors(model.config().clone(), weights, DType::F32, &Device::Cpu).unwrap();
        let mut opt2 = if from_file {
            AdamW::load(cfg, &state_file, &resumed.params()).unwrap()
        } else {
            AdamW::from_state_tensors(cfg, &state_map, &resumed.params()).unwrap()
        };
        assert_eq!(opt2.steps_done(), 4);
        let continued = train(&resumed, &mut opt2, 6, 10);
        assert_eq!(continued, uninterrupted, "losses after resume differ (from_file={from_file})");
        let got = snapshot(&resumed);
        for ((n, a), (_, b)) in got.iter().zip(&expected) {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "`{n}` differs after resume (from_file={from_file})");
        }
    }
}

#[test]
fn state_for_other_params_is_refused() {
    let model = Llama::random(tiny_cfg(), 5, DType::F32, &Device::Cpu).unwrap();
    let mut opt = AdamW::new(AdamWConfig::default());
    train(&model, &mut opt, 1, 10);
    let state = opt.state_tensors().unwrap();
    let student = Llama::random(tiny_cfg(), 5, DType::F32, &Device::Cpu).unwrap().keep_layers(&[1]).unwrap();
    let err = AdamW::from_state_tensors(AdamWConfig::default(), &state, &student.params()).err().unwrap().to_string();
    assert!(err.contains("model.layers.1."), "{err}");
    let err =
        AdamW::from_state_tensors(AdamWConfig::default(), &std::collections::HashMap::new(), &model.params()).err().unwrap().to_string();
    assert!(err.contains("adamw.step"), "{err}");
}

#[test]
fn missing_gradient_is_an_error_naming_the_param() {
    let a = Var::from_tensor(&Tensor::ones(3, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let unused = Var::from_tensor(&Tensor::ones(3, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let params = vec![("a".to_string(), a.clone()), ("unused".to_string(), unused)];
    let grads = a.as_tensor().sum_all().unwrap().backward().unwrap();
    let err = AdamW::new(AdamWConfig::default()).step(&params, &grads, 0.1).err().unwrap().to_string();
    assert!(err.contains("unused"), "{err}");
    assert_eq!(vals(a.as_tensor()), vec![1.0; 3], "nothing may change when a gradient is missing");
}

#[test]
fn lr_schedule_warmup_peak_floor() {
    let (base, warm, total) = (2e-4, 10, 110);
    assert!((lr_at(0, base, warm, total) - base / 10.0).abs() < 1e-18);
    assert!((lr_at(4, base, warm, total) - base * 0.5).abs() < 1e-18);
    assert!((lr_at(9, base, warm, total) - base).abs() < 1e-18, "peak at the last warmup update");
    let mid = lr_at(59, base, warm, total); // half-way through the decay: (1 + cos(π/2)) / 2 = 0.5
    assert!((mid - (LR_FLOOR_FRACTION * base + (1.0 - LR_FLOOR_FRACTION) * base * 0.5)).abs() < 1e-15, "{mid}");
    assert!((lr_at(109, base, warm, total) - 0.1 * base).abs() < 1e-18, "floor at the last update");
    assert_eq!(lr_at(500, base, warm, total), lr_at(109, base, warm, total), "held after the end");
    let mut prev = f64::INFINITY;
    for s in 9..110 {
        let lr = lr_at(s, base, warm, total);
        assert!(lr <= prev && lr >= 0.1 * base - 1e-18);
        prev = lr;
    }
    assert!((lr_at(0, base, 0, 100) - base).abs() < base * 1e-3, "no warmup: starts at the peak");
    assert!((lr_at(5, base, 10, 10) - base * 0.6).abs() < 1e-18, "total ≤ warmup: warmup only");
    assert_eq!(lr_at(50, base, 10, 10), base);
}

#[test]
fn clip_scales_global_norm() {
    let model = Llama::random(tiny_cfg(), 2, DType::F64, &Device::Cpu).unwrap();
    let params = model.params();
    let (sum, _) = loss_rows(&model, 0..2);
    let mut grads = sum.backward().unwrap();
    let by_hand: f64 =
        params.iter().map(|(_, v)| vals(grads.get(v.as_tensor()).unwrap()).iter().map(|g| g * g).sum::<f64>()).sum::<f64>().sqrt();
    let before: Vec<Vec<f64>> = params.iter().map(|(_, v)| vals(grads.get(v.as_tensor()).unwrap())).collect();
    assert!(by_hand > 0.0);
    // Above the norm: nothing changes.
    let n = clip_grad_norm(&mut grads, &params, by_hand * 2.0).unwrap();
    assert!((n - by_hand).abs() < 1e-12 * by_hand);
    assert!((grad_norm(&grads, &params).unwrap() - by_hand).abs() < 1e-12 * by_hand);
    // Below: scaled to exactly max_norm, direction kept, pre-clip norm returned.
    let max = by_hand / 4.0;
    let n = clip_grad_norm(&mut grads, &params, max).unwrap();
    assert!((n - by_hand).abs() < 1e-12 * by_hand, "returns the pre-clip norm");
    assert!((grad_norm(&grads, &params).unwrap() - max).abs() < 1e-12 * max);
    for ((_, v), b) in params.iter().zip(&before) {
        for (g, b) in vals(grads.get(v.as_tensor()).unwrap()).iter().zip(b) {
            assert!((g - b / 4.0).abs() < 1e-15 + 1e-12 * b.abs());
        }
    }
}

#[test]
fn accumulated_micro_batches_equal_the_full_batch() {
    let model = Llama::random(tiny_cfg(), 2, DType::F64, &Device::Cpu).unwrap();
    let params = model.params();
    let (full, _) = loss_rows(&model, 0..2);
    let full = full.backward().unwrap();
    let mut acc = None;
    for r in 0..2 {
        let (sum, _) = loss_rows(&model, r..r + 1);
        accumulate_grads(&mut acc, sum.backward().unwrap(), &params).unwrap();
    }
    let acc = acc.unwrap();
    for (name, v) in &params {
        for (a, b) in vals(acc.get(v.as_tensor()).unwrap()).iter().zip(vals(full.get(v.as_tensor()).unwrap())) {
            assert!((a - b).abs() < 1e-12, "`{name}`: {a} vs {b}");
        }
    }
}

#[test]
fn loss_goes_down_on_a_fixed_batch() {
    let model = Llama::random(tiny_cfg(), 3, DType::F32, &Device::Cpu).unwrap();
    let mut opt = AdamW::new(AdamWConfig::default());
    let losses = train(&model, &mut opt, 30, 30);
    let (first, last) = (losses[0], *losses.last().unwrap());
    eprintln!("loss {first:.3} → {last:.3} in 30 steps");
    assert!((first - (32f64).ln()).abs() < 0.1, "a fresh model is near uniform: {first}");
    assert!(last < 0.5 * first, "loss {first} → {last}");
}
