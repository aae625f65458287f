//! The student model: autograd against finite differences for every parameter, packing
//! (positions reset, no attention across examples), keep_layers, loading, and the logits of a
//! real checkpoint against the server's independent inference engine.

use candle_core::{DType, Device, Tensor, Var};
use server::model::hf::HfLlamaConfig;
use trainer::model::{masked_cross_entropy, Llama};

fn tiny_cfg(tied: bool, layers: usize) -> HfLlamaConfig {
    serde_json::from_value(serde_json::json!({
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 32,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 64,
        "tie_word_embeddings": tied,
    }))
    .unwrap()
}

/// Deterministic test noise in [-1, 1).
struct Noise(u64);
impl Noise {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

/// HF's init (std 0.02) leaves a tiny model almost linear, with near-uniform attention; scale
/// matrices ×10 and jitter the norms so every nonlinearity (softmax, RMSNorm, SiLU) and every
/// norm weight matters to the gradient check.
fn roughen(model: &Llama, seed: u64) {
    let mut noise = Noise(seed);
    for (_, var) in model.params() {
        let t = var.as_tensor();
        let vals: Vec<f64> = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let vals: Vec<f64> =
            if t.rank() == 1 { vals.iter().map(|_| 1.0 + 0.5 * noise.next()).collect() } else { vals.iter().map(|v| v * 10.0).collect() };
        var.set(&Tensor::from_vec(vals, t.dims(), t.device()).unwrap().to_dtype(t.dtype()).unwrap()).unwrap();
    }
}

fn u32s(rows: &[&[u32]]) -> Tensor {
    let t = rows[0].len();
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).unwrap()
}

fn floats(rows: &[&[f64]], dtype: DType) -> Tensor {
    let t = rows[0].len();
    let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

/// Two rows of 6: row 0 packs two examples (segments 1, 2, positions reset); row 1 is one
/// example of 5 plus a padding token (segment 0, masked).
struct Batch {
    input: Tensor,
    positions: Tensor,
    segments: Tensor,
    targets: Tensor,
    mask: Tensor,
}

fn fd_batch(dtype: DType) -> Batch {
    Batch {
        input: u32s(&[&[3, 7, 1, 9, 4, 2], &[5, 5, 8, 30, 11, 0]]),
        positions: u32s(&[&[0, 1, 2, 0, 1, 2], &[0, 1, 2, 3, 4, 0]]),
        segments: u32s(&[&[1, 1, 1, 2, 2, 2], &[1, 1, 1, 1, 1, 0]]),
        targets: u32s(&[&[7, 1, 0, 4, 2, 0], &[5, 8, 30, 11, 17, 0]]),
        mask: floats(&[&[1., 1., 0., 1., 1., 0.], &[1., 1., 1., 1., 1., 0.]], dtype),
    }
}

fn mean_loss(model: &Llama, b: &Batch) -> Tensor {
    let logits = model.forward(&b.input, &b.positions, &b.segments).unwrap();
    let (sum, count) = masked_cross_entropy(&logits, &b.targets, &b.mask).unwrap();
    (sum / count).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn set_values(var: &Var, vals: &[f64]) {
    let t = Tensor::from_vec(vals.to_vec(), var.dims(), var.device()).unwrap().to_dtype(var.dtype()).unwrap();
    var.set(&t).unwrap();
}

/// Central differences against autograd for `per_tensor` entries of every parameter (the
/// largest-gradient entry plus pseudo-random ones); returns the worst relative error.
fn gradient_check(tied: bool, per_tensor: usize) -> f64 {
    let model = Llama::random(tiny_cfg(tied, 2), 7, DType::F64, &Device::Cpu).unwrap();
    roughen(&model, 99);
    let batch = fd_batch(DType::F64);
    let loss = mean_loss(&model, &batch);
    let grads = loss.backward().unwrap();
    let params = model.params();
    assert_eq!(params.len(), 2 + 9 * 2 + usize::from(!tied));
    let h = 1e-5;
    let mut noise = Noise(12345);
    let mut worst = (0.0f64, String::new());
    for (name, var) in &params {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("`{name}` has no gradient: the graph is cut"));
        let g = values(g);
        let max_abs = g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(max_abs > 0.0, "`{name}`: gradient is all zero (cut by a non-differentiable op?)");
        let base = values(var.as_tensor());
        let mut idx: Vec<usize> = vec![g.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap().0];
        while idx.len() < per_tensor.min(base.len()) {
            let i = ((noise.next() + 1.0) / 2.0 * base.len() as f64) as usize % base.len();
            if !idx.contains(&i) {
                idx.push(i);
            }
        }
        for i in idx {
            let mut p = base.clone();
            p[i] = base[i] + h;
            set_values(var, &p);
            let lp: f64 = mean_loss(&model, &batch).to_scalar().unwrap();
            p[i] = base[i] - h;
            set_values(var, &p);
            let lm: f64 = mean_loss(&model, &batch).to_scalar().unwrap();
            set_values(var, &base);
            let num = (lp - lm) / (2.0 * h);
            let scale = g[i].abs().max(num.abs());
            if scale < 1e-7 {
                // An entry the loss does not depend on (e.g. an unused token's embedding row).
                assert!((g[i] - num).abs() < 1e-9, "`{name}`[{i}]: autograd {} vs numeric {num}", g[i]);
                continue;
            }
            let rel = (g[i] - num).abs() / scale;
            assert!(rel < 1e-5, "`{name}`[{i}]: autograd {} vs numeric {num} (relative error {rel:.2e})", g[i]);
            if rel > worst.0 {
                worst = (rel, format!("{name}[{i}]"));
            }
        }
    }
    eprintln!("gradient check (tied={tied}): worst relative error {:.2e} at {}", worst.0, worst.1);
    worst.0
}

#[test]
fn gradients_match_finite_differences_tied() {
    gradient_check(true, 12);
}

#[test]
fn gradients_match_finite_differences_untied() {
    gradient_check(false, 6);
}

/// Logits of a single, unpadded example.
fn alone(model: &Llama, tokens: &[u32]) -> Tensor {
    let n = tokens.len() as u32;
    let pos: Vec<u32> = (0..n).collect();
    let seg = vec![1u32; tokens.len()];
    model.forward(&u32s(&[tokens]), &u32s(&[&pos]), &u32s(&[&seg])).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    values(&(a - b).unwrap().abs().unwrap()).into_iter().fold(0.0, f64::max)
}

/// Loss of one example inside a row: mask covers its next-token targets.
fn example_loss(logits: &Tensor, row: &[u32], start: usize, len: usize, dtype: DType) -> f64 {
    let t = row.len();
    let mut targets = vec![0u32; t];
    let mut mask = vec![0f64; t];
    for i in start..start + len - 1 {
        targets[i] = row[i + 1];
        mask[i] = 1.0;
    }
    let (sum, _) = masked_cross_entropy(logits, &u32s(&[&targets]), &floats(&[&mask], dtype)).unwrap();
    sum.to_dtype(DType::F64).unwrap().to_scalar().unwrap()
}

fn packing_matches_separate(dtype: DType) -> f64 {
    let model = Llama::random(tiny_cfg(true, 2), 3, dtype, &Device::Cpu).unwrap();
    roughen(&model, 5);
    let a: &[u32] = &[3, 7, 1, 9];
    let b: &[u32] = &[5, 8, 2];
    // Row: A, B, one padding token; and left padding before A.
    let row: Vec<u32> = [a, b, &[0]].concat();
    let packed = model.forward(&u32s(&[&row]), &u32s(&[&[0, 1, 2, 3, 0, 1, 2, 0]]), &u32s(&[&[1, 1, 1, 1, 2, 2, 2, 0]])).unwrap();
    let (la, lb) = (alone(&model, a), alone(&model, b));
    let mut worst = max_diff(&packed.narrow(1, 0, 4).unwrap(), &la).max(max_diff(&packed.narrow(1, 4, 3).unwrap(), &lb));
    let loss_a = example_loss(&la, a, 0, 4, dtype);
    let loss_b = example_loss(&lb, b, 0, 3, dtype);
    let packed_a = example_loss(&packed, &row, 0, 4, dtype);
    let packed_b = example_loss(&packed, &row, 4, 3, dtype);
    worst = worst.max((loss_a - packed_a).abs()).max((loss_b - packed_b).abs());

    let left: Vec<u32> = [&[0, 0], a].concat();
    let lp = model.forward(&u32s(&[&left]), &u32s(&[&[0, 0, 0, 1, 2, 3]]), &u32s(&[&[0, 0, 1, 1, 1, 1]])).unwrap();
    worst = worst.max(max_diff(&lp.narrow(1, 2, 4).unwrap(), &la));
    eprintln!("packing ({dtype:?}): max |packed − separate| over logits and losses = {worst:.2e}");
    worst
}

#[test]
fn packed_examples_match_separate_runs_f64() {
    assert!(packing_matches_separate(DType::F64) < 1e-10);
}

#[test]
fn packed_examples_match_separate_runs_f32() {
    assert!(packing_matches_separate(DType::F32) < 1e-5);
}

#[test]
fn no_attention_across_examples() {
    let model = Llama::random(tiny_cfg(true, 2), 11, DType::F64, &Device::Cpu).unwrap();
    roughen(&model, 6);
    let pos = u32s(&[&[0, 1, 2, 3, 0, 1, 2]]);
    let run = |tokens: &[u32], segments: &[u32]| model.forward(&u32s(&[tokens]), &pos, &u32s(&[segments])).unwrap();
    let packed = [1, 1, 1, 1, 2, 2, 2];
    let (x, y) = ([3, 7, 1, 9, 5, 8, 2], [20, 4, 4, 13, 5, 8, 2]); // A differs, B is the same
    let b_of = |t: &Tensor| t.narrow(1, 4, 3).unwrap();
    let leak = max_diff(&b_of(&run(&x, &packed)), &b_of(&run(&y, &packed)));
    assert!(leak == 0.0, "example B's logits changed by {leak:e} when only example A changed");
    // Control: the same rows as one segment do let A reach B, so the check above can fail.
    let one = [1; 7];
    let control = max_diff(&b_of(&run(&x, &one)), &b_of(&run(&y, &one)));
    assert!(control > 1e-3, "control: one segment should let A influence B ({control:e})");
    // And A's own later logits do depend on its earlier tokens (causal attention works).
    let a_last = |t: &Tensor| t.narrow(1, 3, 1).unwrap();
    assert!(max_diff(&a_last(&run(&x, &packed)), &a_last(&run(&[3, 7, 2, 9, 5, 8, 2], &packed))) > 1e-3);
}

#[test]
fn keep_layers_selects_and_renumbers() {
    let src = Llama::random(tiny_cfg(true, 4), 1, DType::F32, &Device::Cpu).unwrap();
    let before = src.named_tensors().unwrap();
    let kept = src.keep_layers(&[0, 2]).unwrap();
    assert_eq!(kept.config().num_hidden_layers, 2);
    assert_eq!(kept.params().len(), 2 + 9 * 2);
    let after = kept.named_tensors().unwrap();
    let find = |ts: &[server::model::hf::NamedTensor], n: &str| ts.iter().find(|t| t.name == n).map(|t| t.values.clone());
    for t in &after {
        let source = match t.name.strip_prefix("model.layers.") {
            Some(rest) => {
                let (i, suffix) = rest.split_once('.').unwrap();
                let src_i = [0, 2][i.parse::<usize>().unwrap()];
                format!("model.layers.{src_i}.{suffix}")
            }
            None => t.name.clone(),
        };
        assert_eq!(Some(t.values.clone()), find(&before, &source), "{} should equal source {source}", t.name);
    }
    assert!(after.iter().all(|t| !t.name.starts_with("model.layers.2.") && !t.name.starts_with("model.layers.3.")));
    // It still runs.
    let l = alone(&kept, &[1, 2, 3]);
    assert_eq!(l.dims(), [1, 3, 32]);

    let model = || Llama::random(tiny_cfg(true, 4), 1, DType::F32, &Device::Cpu).unwrap();
    let err = model().keep_layers(&[0, 4]).err().unwrap().to_string();
    assert!(err.contains("index 4") && err.contains("4 layers"), "{err}");
    let err = model().keep_layers(&[2, 1]).err().unwrap().to_string();
    assert!(err.contains("strictly increasing") && err.contains('1') && err.contains('2'), "{err}");
    assert!(model().keep_layers(&[1, 1]).is_err());
    assert!(model().keep_layers(&[]).is_err());
}

#[test]
fn params_are_sorted_and_named_like_hf() {
    let m = Llama::random(tiny_cfg(false, 2), 1, DType::F32, &Device::Cpu).unwrap();
    let names: Vec<String> = m.params().into_iter().map(|(n, _)| n).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    for n in [
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ] {
        assert!(names.iter().any(|x| x == n), "missing {n}");
    }
    let shape = |n: &str| m.params().into_iter().find(|(x, _)| x == n).unwrap().1.dims().to_vec();
    assert_eq!(shape("model.layers.0.self_attn.k_proj.weight"), [8, 16]); // [out = kv·head_dim, in]
    assert_eq!(shape("model.layers.0.mlp.down_proj.weight"), [16, 24]);
    assert_eq!(m.num_params(), 2 * 32 * 16 + 16 + 2 * (2 * 16 + 2 * 16 * 16 + 2 * 8 * 16 + 3 * 16 * 24));
}

#[test]
fn random_init_is_seeded_and_hf_like() {
    let a = Llama::random(tiny_cfg(true, 1), 42, DType::F32, &Device::Cpu).unwrap().named_tensors().unwrap();
    let b = Llama::random(tiny_cfg(true, 1), 42, DType::F32, &Device::Cpu).unwrap().named_tensors().unwrap();
    let c = Llama::random(tiny_cfg(true, 1), 43, DType::F32, &Device::Cpu).unwrap().named_tensors().unwrap();
    assert!(a.iter().zip(&b).all(|(x, y)| x.values == y.values));
    assert!(a.iter().zip(&c).any(|(x, y)| x.values != y.values));
    let embed = &a.iter().find(|t| t.name == "model.embed_tokens.weight").unwrap().values;
    let std = (embed.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / embed.len() as f64).sqrt();
    assert!((std - 0.02).abs() < 0.003, "std {std}");
    assert!(a.iter().filter(|t| t.shape.len() == 1).all(|t| t.values.iter().all(|v| *v == 1.0)));
}

#[test]
fn from_tensors_round_trips_and_checks() {
    let m = Llama::random(tiny_cfg(false, 2), 9, DType::F32, &Device::Cpu).unwrap();
    let l1 = alone(&m, &[4, 5, 6]);
    let m2 = Llama::from_tensors(m.config().clone(), m.named_tensors().unwrap(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(max_diff(&l1, &alone(&m2, &[4, 5, 6])), 0.0);

    let mut ts = m.named_tensors().unwrap();
    ts.retain(|t| t.name != "model.layers.1.mlp.up_proj.weight");
    let err = Llama::from_tensors(m.config().clone(), ts, DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");

    let mut ts = m.named_tensors().unwrap();
    let t = ts.iter_mut().find(|t| t.name == "model.norm.weight").unwrap();
    t.shape = vec![8, 2];
    let err = Llama::from_tensors(m.config().clone(), ts, DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("model.norm.weight") && err.contains("shape"), "{err}");

    let mut ts = m.named_tensors().unwrap();
    ts.push(server::model::hf::NamedTensor { name: "model.layers.5.mlp.up_proj.weight".into(), shape: vec![1], values: vec![0.0] });
    assert!(Llama::from_tensors(m.config().clone(), ts, DType::F32, &Device::Cpu).is_err());
}

#[test]
fn cross_entropy_is_masked_and_stable() {
    // Huge logits: a naive softmax would overflow.
    let logits = Tensor::from_vec(vec![1000f32, 0., -1000., 0., 1000., 0.], (1, 2, 3), &Device::Cpu).unwrap();
    let (sum, count) = masked_cross_entropy(&logits, &u32s(&[&[1, 1]]), &floats(&[&[1.0, 0.0]], DType::F32)).unwrap();
    assert_eq!(count, 1.0);
    let v: f32 = sum.to_scalar().unwrap();
    assert!((v - 1000.0).abs() < 1e-3, "{v}");
    let (sum, count) = masked_cross_entropy(&logits, &u32s(&[&[0, 1]]), &floats(&[&[1.0, 1.0]], DType::F32)).unwrap();
    assert_eq!(count, 2.0);
    assert!((sum.to_scalar::<f32>().unwrap()).abs() < 1e-3);
}

/// Logits of every position of `tokens` from the server's native engine.
fn engine_logits(path: &std::path::Path, precision: server::engine::llama::Precision, tokens: &[u32]) -> Vec<f32> {
    use server::engine::llama::{Chunk, KvCache, Llama as Engine};
    let engine = Engine::load(path, precision).unwrap();
    let mut cache = KvCache::new(&engine.cfg);
    let mut chunks = [Chunk { cache: &mut cache, tokens, all_logits: true }];
    engine.forward(&mut chunks).unwrap().remove(0)
}

/// The real SmolLM2-135M checkpoint (GGUF dequantized to f32) against the server's native
/// engine, an independent implementation (GGUF row order, ggml-style RoPE). In f32 the two
/// give the same logits to float rounding; in the engine's default arithmetic (Q8
/// activations, f16 attention) a few tenths of a logit of noise. This catches a wrong RoPE
/// convention or Q/K row order, which the self-consistent gradient check cannot; the control
/// (RoPE disabled by zero positions) shows the comparison is sharp enough to notice.
#[test]
fn gguf_logits_match_server_engine() {
    use server::engine::llama::Precision;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        eprintln!("skipped: {} is not present", path.display());
        return;
    }
    let tokens: Vec<u32> = vec![1, 504, 3458, 282, 4649, 314, 3767, 30, 378, 2014, 314, 253, 1345, 282, 28, 1092];
    let quantized = engine_logits(&path, Precision::Quantized, &tokens);
    let exact = engine_logits(&path, Precision::F32, &tokens);

    let student = Llama::load(&path, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(student.config().num_hidden_layers, 30);
    let vocab = student.config().vocab_size;
    assert_eq!(quantized.len(), tokens.len() * vocab);
    let compare = |logits: &Tensor, theirs: &[f32]| -> (usize, f32, f32) {
        let rows: Vec<Vec<f32>> = logits.squeeze(0).unwrap().to_vec2().unwrap();
        let (mut agree, mut worst, mut spread) = (0, 0f32, 0f32);
        for (i, row) in rows.iter().enumerate() {
            let other = &theirs[i * vocab..(i + 1) * vocab];
            agree += usize::from(server::engine::llama::argmax(row) == server::engine::llama::argmax(other));
            for (a, b) in row.iter().zip(other) {
                worst = worst.max((a - b).abs());
                spread = spread.max(a.abs());
            }
        }
        (agree, worst, spread)
    };
    let ours = alone(&student, &tokens);
    let (agree, worst, spread) = compare(&ours, &quantized);
    let (e_agree, e_worst, _) = compare(&ours, &exact);
    let zeros = vec![0u32; tokens.len()];
    let ones = vec![1u32; tokens.len()];
    let no_rope = student.forward(&u32s(&[&tokens]), &u32s(&[&zeros]), &u32s(&[&ones])).unwrap();
    let (c_agree, c_worst, _) = compare(&no_rope, &exact);
    let n = tokens.len();
    eprintln!(
        "GGUF vs server engine: f32 argmax agrees at {e_agree}/{n}, max |Δlogit| {e_worst:.5}; quantized {agree}/{n}, \
         max |Δlogit| {worst:.3} (max |logit| {spread:.1}); control without RoPE: {c_agree}/{n}, max |Δlogit| {c_worst:.3}"
    );
    assert_eq!(e_agree, n, "argmax agrees with the f32 engine at only {e_agree}/{n} positions");
    assert!(e_worst < 1e-3 * spread, "logits differ from the f32 engine's by up to {e_worst}");
    assert!(agree + 1 >= n, "argmax agrees with the quantized engine at only {agree}/{n} positions");
    assert!(worst < 0.1 * spread, "logits differ from the quantized engine's by up to {worst}");
    assert!(c_worst > 3.0 * worst, "control: disabling RoPE should be clearly worse ({c_worst} vs {worst})");
}
