//! Training speed and memory of the candle student against PyTorch eager on the same CPU
//! (issue 4): SmolLM2-135M-Instruct pruned to 8 layers (0, 4, …, 28), f32, one fixed packed
//! batch of 4 rows × 512 tokens, the step of trainer/src/train.rs (forward, masked CE mean,
//! backward, clip 1.0, AdamW). Reported: tokens/s (non-padding input tokens per second, median
//! over the steps after the warmup), peak RSS (VmHWM) and the step-1 loss of each side.
//!
//! Run: `cargo bench -p trainer --bench train` (needs models/ from scripts/fetch-model.sh;
//! the PyTorch side needs the venv of bench/setup-torch.sh and is skipped without it).
//!
//! Each side runs in its own fresh process that loads the same HF folder (written here with
//! `write_folder`) and the same batch file, so the peak RSS figures compare like with like:
//! the candle side is this binary re-executed as a worker, the PyTorch side
//! bench/train_torch.py. After the steps both time the model's parts one by one (forward and
//! backward of each, with the shapes of the run) so that a gap can be attributed.
//!
//! Env: BENCH_STEPS (5), BENCH_WARMUP (1), BENCH_ROWS (4), BENCH_SEQ (512), BENCH_PROFILE
//! (1; 0 skips the per-part timings), BENCH_SDPA (1; 0 skips the extra PyTorch run with
//! F.scaled_dot_product_attention), BENCH_DIR (keep the model folder and batch there),
//! BENCH_WORKER_ENV (extra NAME=VALUE,... for both sides' processes, e.g. malloc tunables),
//! BENCH_GLIBC_DEFAULTS (0; 1 runs the candle side without trainer::alloc's malloc settings),
//! TORCH_PYTHON (default: the venv's python), RAYON_NUM_THREADS (candle's matmul threads;
//! default: all cores; PyTorch gets the same count).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use serde_json::{json, Value};

use distill_tests::harness::{repo_root, smollm2_gguf, venv_python};
use server::model::gguf::GgufMetadata;
use server::model::hf::{read_gguf_as_hf, write_folder};
use server::model::tokenizer::ModelTokenizer;
use trainer::model::{linear, masked_cross_entropy, rms_norm, Llama};
use trainer::ops::{attention_values, composed, masked_softmax, rope_heads, silu_mul};
use trainer::optim::{clip_grad_norm, AdamW, AdamWConfig};

const KEEP: [usize; 8] = [0, 4, 8, 12, 16, 20, 24, 28];
const LR: f64 = 1e-4;
const MAX_GRAD_NORM: f64 = 1.0;
const WORKER_ENV: &str = "TRAIN_BENCH_WORKER";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A line of /proc/self/status in MiB (VmRSS: now, VmHWM: peak).
fn vm_mib(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// MiB of memory allocated through malloc and not yet freed (heap + mmapped chunks): unlike
/// RSS, it drops as soon as a tensor is freed and rises by exactly what is allocated. The
/// PyTorch script reads the same counter (its CPU allocator is malloc too).
fn heap_mib() -> f64 {
    // SAFETY: mallinfo2 only reads the allocator's statistics (glibc >= 2.33).
    let m = unsafe { libc::mallinfo2() };
    (m.uordblks + m.hblkhd) as f64 / (1024.0 * 1024.0)
}

/// (user CPU s, system CPU s, minor page faults) of this process so far, all threads: the
/// same getrusage(RUSAGE_SELF) the PyTorch script reads through Python's `resource`.
fn cpu_and_faults() -> (f64, f64, f64) {
    // SAFETY: getrusage writes into the zeroed struct we own and reads nothing else.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) } != 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    (secs(r.ru_utime), secs(r.ru_stime), r.ru_minflt as f64)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn threads() -> usize {
    env_usize("RAYON_NUM_THREADS", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

// ---------------------------------------------------------------------------------------------
// The batch.

/// A packed batch, as trainer::data::pack lays it out ([rows × len], segments from 1, 0 = padding).
struct BatchData {
    rows: usize,
    len: usize,
    input: Vec<u32>,
    target: Vec<u32>,
    mask: Vec<f32>,
    positions: Vec<u32>,
    segments: Vec<u32>,
}

/// Deterministic pseudo-random token ids, a few packed examples per row (some rows end in
/// padding), the loss on the second half of each example.
fn make_batch(rows: usize, len: usize, vocab: usize) -> BatchData {
    let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let n = rows * len;
    let mut b = BatchData {
        rows,
        len,
        input: vec![0; n],
        target: vec![0; n],
        mask: vec![0.0; n],
        positions: vec![0; n],
        segments: vec![0; n],
    };
    for r in 0..rows {
        let lens: Vec<usize> = match r % 4 {
            0 => vec![len / 2, len / 4, len / 8],
            1 => vec![len - len / 8],
            2 => vec![len / 4, len / 4, len / 4, len / 8],
            _ => vec![len],
        };
        let mut at = r * len;
        for (k, &l) in lens.iter().enumerate() {
            let ids: Vec<u32> = (0..=l).map(|_| (next() % vocab as u64) as u32).collect();
            for i in 0..l {
                b.input[at + i] = ids[i];
                // The last token's target is the id after it, as if the answer went on.
                b.target[at + i] = ids[i + 1];
                b.mask[at + i] = if i >= l / 2 { 1.0 } else { 0.0 };
                b.positions[at + i] = i as u32;
                b.segments[at + i] = k as u32 + 1;
            }
            at += l;
        }
    }
    b
}

fn rows_of<T: Clone + serde::Serialize>(v: &[T], len: usize) -> Value {
    json!(v.chunks(len).map(|c| c.to_vec()).collect::<Vec<_>>())
}

fn write_batch(b: &BatchData, path: &Path) -> Result<()> {
    let j = json!({
        "input": rows_of(&b.input, b.len),
        "target": rows_of(&b.target, b.len),
        "mask": rows_of(&b.mask, b.len),
        "positions": rows_of(&b.positions, b.len),
        "segments": rows_of(&b.segments, b.len),
    });
    std::fs::write(path, serde_json::to_vec(&j)?)?;
    Ok(())
}

fn read_batch(path: &Path) -> Result<BatchData> {
    let j: Value = serde_json::from_slice(&std::fs::read(path)?)?;
    let rows = j["input"].as_array().context("input")?;
    let (r, len) = (rows.len(), rows[0].as_array().context("input row")?.len());
    let flat = |k: &str| -> Vec<f64> {
        j[k].as_array().unwrap().iter().flat_map(|row| row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap())).collect()
    };
    let u = |k: &str| flat(k).into_iter().map(|x| x as u32).collect::<Vec<u32>>();
    Ok(BatchData {
        rows: r,
        len,
        input: u("input"),
        target: u("target"),
        mask: flat("mask").into_iter().map(|x| x as f32).collect(),
        positions: u("positions"),
        segments: u("segments"),
    })
}

// ---------------------------------------------------------------------------------------------
// The candle side (runs in a fresh process: this binary with TRAIN_BENCH_WORKER=DIR).

struct Tensors {
    input: Tensor,
    target: Tensor,
    mask: Tensor,
    positions: Tensor,
    segments: Tensor,
}

fn tensors(b: &BatchData, dev: &Device) -> Result<Tensors> {
    let shape = (b.rows, b.len);
    Ok(Tensors {
        input: Tensor::from_slice(&b.input, shape, dev)?,
        target: Tensor::from_slice(&b.target, shape, dev)?,
        mask: Tensor::from_slice(&b.mask, shape, dev)?,
        positions: Tensor::from_slice(&b.positions, shape, dev)?,
        segments: Tensor::from_slice(&b.segments, shape, dev)?,
    })
}

fn worker(dir: &Path) -> Result<()> {
    // As the trainer binary does (BENCH_GLIBC_DEFAULTS=1 measures without it).
    if env_usize("BENCH_GLIBC_DEFAULTS", 0) == 0 {
        trainer::alloc::keep_freed_memory();
    }
    let steps = env_usize("BENCH_STEPS", 5).max(1);
    let warmup = env_usize("BENCH_WARMUP", 1).min(steps - 1);
    let dev = Device::Cpu;
    let rss_start = vm_mib("VmRSS");
    let heap_start = heap_mib();
    let model = Llama::load(&dir.join("model"), DType::F32, &dev)?;
    let b = read_batch(&dir.join("batch.json"))?;
    let t = tensors(&b, &dev)?;
    let real_tokens = b.segments.iter().filter(|s| **s > 0).count();
    let loss_tokens: f32 = b.mask.iter().sum();
    let rss_load = vm_mib("VmRSS");
    let heap_load = heap_mib();
    let params = model.params();
    let mut opt = AdamW::new(AdamWConfig::default());
    let (mut losses, mut step_s, mut fwd_s, mut bwd_s, mut clip_s, mut opt_s) = (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut user_s, mut sys_s, mut faults) = (vec![], vec![], vec![]);
    let (mut rss_fwd, mut rss_bwd, mut heap_fwd, mut heap_bwd, mut heap_after) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for step in 0..steps {
        // As train.rs: the forward graph lives until the backward is done, then is dropped.
        let c0 = cpu_and_faults();
        let t0 = Instant::now();
        let mut grads = {
            let logits = model.forward(&t.input, &t.positions, &t.segments)?;
            let (sum, _) = masked_cross_entropy(&logits, &t.target, &t.mask)?;
            let loss = (sum / loss_tokens as f64)?;
            losses.push(loss.to_scalar::<f32>()? as f64);
            fwd_s.push(t0.elapsed().as_secs_f64());
            if step == 0 {
                rss_fwd = vm_mib("VmRSS");
                heap_fwd = heap_mib();
            }
            let t1 = Instant::now();
            let g = loss.backward()?;
            bwd_s.push(t1.elapsed().as_secs_f64());
            if step == 0 {
                rss_bwd = vm_mib("VmRSS");
                heap_bwd = heap_mib();
            }
            g
        };
        let t2 = Instant::now();
        clip_grad_norm(&mut grads, &params, MAX_GRAD_NORM)?;
        clip_s.push(t2.elapsed().as_secs_f64());
        let t3 = Instant::now();
        opt.step(&params, &grads, LR)?;
        drop(grads);
        opt_s.push(t3.elapsed().as_secs_f64());
        step_s.push(t0.elapsed().as_secs_f64());
        let c1 = cpu_and_faults();
        user_s.push(c1.0 - c0.0);
        sys_s.push(c1.1 - c0.1);
        faults.push(c1.2 - c0.2);
        if step == 0 {
            heap_after = heap_mib();
        }
        eprintln!("candle step {}: loss {:.6}, {:.2} s", step + 1, losses[step], step_s[step]);
    }
    let peak = vm_mib("VmHWM");
    let timed = &step_s[warmup..];
    let components = if env_usize("BENCH_PROFILE", 1) != 0 { profile(&model, &t, loss_tokens)? } else { json!({}) };
    println!(
        "{}",
        json!({
            "impl": "candle 0.10.2",
            "threads": threads(),
            "batch": [b.rows, b.len],
            "tokens": real_tokens,
            "loss_tokens": loss_tokens,
            "tokens_per_s": real_tokens as f64 / median(timed),
            "step_s": median(timed),
            "forward_s": median(&fwd_s[warmup..]),
            "backward_s": median(&bwd_s[warmup..]),
            "clip_s": median(&clip_s[warmup..]),
            "optimizer_s": median(&opt_s[warmup..]),
            "user_cpu_s": median(&user_s[warmup..]),
            "sys_cpu_s": median(&sys_s[warmup..]),
            "minor_faults": median(&faults[warmup..]),
            "peak_rss_mib": peak,
            "rss_start_mib": rss_start,
            "rss_after_load_mib": rss_load,
            "rss_after_forward_mib": rss_fwd,
            "rss_after_backward_mib": rss_bwd,
            "heap_start_mib": heap_start,
            "heap_after_load_mib": heap_load,
            "heap_after_forward_mib": heap_fwd,
            "heap_after_backward_mib": heap_bwd,
            "heap_after_step_mib": heap_after,
            "losses": losses,
            "components": components,
        })
    );
    Ok(())
}

// The model's parts (trainer::model's building blocks and trainer::ops' fused kernels),
// timed forward and backward one at a time with the shapes of the run.

fn var(t: &Tensor) -> Result<Var> {
    Ok(Var::from_tensor(&t.detach().contiguous()?)?)
}

/// Times the part `f` forward from fresh leaf Vars (copies of `inputs`, made untimed: the
/// parameters and the activations that flow into the part in the model), then the backward of
/// its output's sum. Returns the medians over `reps` runs of (forward s, backward s, MiB the
/// forward graph holds: malloc'd memory growth over the forward, its output included).
fn time_part(reps: usize, inputs: &[&Tensor], f: &dyn Fn(&[Tensor]) -> Result<Tensor>) -> Result<(f64, f64, f64)> {
    let (mut fw, mut bw, mut mem) = (vec![], vec![], vec![]);
    for _ in 0..reps {
        let leaves: Vec<Var> = inputs.iter().map(|t| var(t)).collect::<Result<_>>()?;
        let xs: Vec<Tensor> = leaves.iter().map(|v| v.as_tensor().clone()).collect();
        let heap0 = heap_mib();
        let t0 = Instant::now();
        let out = f(&xs)?;
        fw.push(t0.elapsed().as_secs_f64());
        mem.push(heap_mib() - heap0);
        let loss = out.sum_all()?;
        let t1 = Instant::now();
        let g = loss.backward()?;
        bw.push(t1.elapsed().as_secs_f64());
        drop(g);
    }
    Ok((median(&fw), median(&bw), median(&mem)))
}

fn profile(model: &Llama, t: &Tensors, loss_tokens: f32) -> Result<Value> {
    let reps = env_usize("BENCH_PROFILE_REPS", 3);
    let cfg = model.config();
    let (b, tt) = t.input.dims2()?;
    let (nh, nkv, d) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
    let eps = cfg.rms_norm_eps;
    let p: BTreeMap<String, Var> = model.params().into_iter().collect();
    let w = |n: &str| p[n].as_tensor().clone();
    let l0 = |n: &str| w(&format!("model.layers.0.{n}.weight"));
    let embed = p["model.embed_tokens.weight"].clone();
    let dev = Device::Cpu;

    // Realistic inputs: the embedded batch, layer 0's normed input, its q/k/v, its scores.
    let x = embed.as_tensor().index_select(&t.input.flatten_all()?, 0)?.detach(); // [B·T, H]
    let xn = rms_norm(&x, &l0("input_layernorm"), eps)?.detach();
    let inv_freq: Vec<f32> = (0..d / 2).map(|j| (1.0 / (cfg.rope_theta as f64).powf((2 * j) as f64 / d as f64)) as f32).collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, 1, d / 2), &dev)?;
    let freqs = t.positions.to_dtype(DType::F32)?.unsqueeze(2)?.broadcast_mul(&inv_freq)?;
    let emb = Tensor::cat(&[&freqs, &freqs], 2)?;
    let (cos, sin) = (emb.cos()?.unsqueeze(1)?, emb.sin()?.unsqueeze(1)?);
    let bias = {
        let same = t.segments.unsqueeze(2)?.broadcast_eq(&t.segments.unsqueeze(1)?)?;
        let causal = Tensor::tril2(tt, DType::U8, &dev)?.broadcast_as((b, tt, tt))?;
        let zero = Tensor::zeros((b, tt, tt), DType::F32, &dev)?;
        let neg = Tensor::full(f32::NEG_INFINITY, (b, tt, tt), &dev)?;
        (same * causal)?.where_cond(&zero, &neg)?.unsqueeze(1)?
    };
    let heads = |y: Tensor, n: usize| -> candle_core::Result<Tensor> { y.reshape((b, tt, n, d))?.transpose(1, 2)?.contiguous() };
    let q = rope_heads(&linear(&xn, &l0("self_attn.q_proj"))?, (b, tt, nh, d), &cos, &sin)?.detach();
    let k = rope_heads(&linear(&xn, &l0("self_attn.k_proj"))?, (b, tt, nkv, d), &cos, &sin)?.detach();
    let v = heads(linear(&xn, &l0("self_attn.v_proj"))?, nkv)?.detach();
    let rep = nh / nkv;
    let scale = 1.0 / (d as f64).sqrt();
    // As in the model: raw scores, the 1/sqrt(d) scale folded into the fused softmax.
    let grouped_qk = |q: &Tensor, k: &Tensor| -> candle_core::Result<Tensor> {
        q.reshape((b, nkv, rep * tt, d))?.matmul(&k.t()?)?.reshape((b, nh, tt, tt))
    };
    let scores = grouped_qk(&q, &k)?.detach();
    let bias = bias.contiguous()?;
    let probs = masked_softmax(&scores, &bias, scale)?.detach();
    let attn_out = attention_values(&probs, &v)?.transpose(1, 2)?.reshape((b * tt, nh * d))?.detach();
    let gate_in = linear(&xn, &l0("mlp.gate_proj"))?.detach();
    let up_in = linear(&xn, &l0("mlp.up_proj"))?.detach();
    let hidden_final = rms_norm(&x, &w("model.norm.weight"), eps)?.detach();
    let logits = linear(&hidden_final, embed.as_tensor())?.reshape((b, tt, cfg.vocab_size))?.detach();

    let mut parts: Vec<(&str, usize, (f64, f64, f64))> = Vec::new();
    let nl = cfg.num_hidden_layers;
    eprintln!("candle: timing the model's parts ({reps} runs each)");
    // Per layer.
    let (wq, wk, wv, wo) = (l0("self_attn.q_proj"), l0("self_attn.k_proj"), l0("self_attn.v_proj"), l0("self_attn.o_proj"));
    let (wg, wu, wd) = (l0("mlp.gate_proj"), l0("mlp.up_proj"), l0("mlp.down_proj"));
    let (q_lin, k_lin, v_lin) = (linear(&xn, &wq)?.detach(), linear(&xn, &wk)?.detach(), linear(&xn, &wv)?.detach());
    let e = embed.as_tensor();
    let flat_input = t.input.flatten_all()?;
    let mut part = |name: &'static str, count: usize, inputs: &[&Tensor], f: &dyn Fn(&[Tensor]) -> Result<Tensor>| -> Result<()> {
        parts.push((name, count, time_part(reps, inputs, f)?));
        Ok(())
    };
    // Per layer.
    part("rms_norm (x2 per layer, +1 final)", 2 * nl + 1, &[&x, &l0("input_layernorm")], &|v| Ok(rms_norm(&v[0], &v[1], eps)?))?;
    part("q/k/v/o projections", nl, &[&xn, &wq, &wk, &wv, &wo], &|v| {
        let (q, k, vv) = (linear(&v[0], &v[1])?, linear(&v[0], &v[2])?, linear(&v[0], &v[3])?);
        Ok(((linear(&q, &v[4])?.sum_all()? + k.sum_all()?)? + vv.sum_all()?)?)
    })?;
    part("head split + RoPE (q, k) + v split", nl, &[&q_lin, &k_lin, &v_lin], &|v| {
        let q = rope_heads(&v[0], (b, tt, nh, d), &cos, &sin)?;
        let k = rope_heads(&v[1], (b, tt, nkv, d), &cos, &sin)?;
        Ok(((q.sum_all()? + k.sum_all()?)? + heads(v[2].clone(), nkv)?.sum_all()?)?)
    })?;
    // (candle: the scale is applied inside the fused softmax below; the part names are shared
    // with bench/train_torch.py, which divides here.)
    // (candle: KV heads not repeated, the query heads of a group multiplied as one block.)
    part("repeat_kv + QK^T / sqrt(d)", nl, &[&q, &k], &|v| Ok(grouped_qk(&v[0], &v[1])?))?;
    part("mask add + softmax [B,H,T,T]", nl, &[&scores], &|v| Ok(masked_softmax(&v[0], &bias, scale)?))?;
    part("repeat_kv + PV + head merge", nl, &[&probs, &v], &|v| {
        Ok(attention_values(&v[0], &v[1])?.transpose(1, 2)?.reshape((b * tt, nh * d))?)
    })?;
    // The SwiGLU product itself is timed below; here a plain sum joins the two branches.
    part("MLP projections (gate, up, down)", nl, &[&xn, &wg, &wu, &wd], &|v| {
        Ok(linear(&(linear(&v[0], &v[1])? + linear(&v[0], &v[2])?)?, &v[3])?)
    })?;
    part("SwiGLU silu(g)*u", nl, &[&gate_in, &up_in], &|v| Ok(silu_mul(&v[0], &v[1])?))?;
    part("residual adds (x2 per layer)", 2 * nl, &[&x, &attn_out], &|v| Ok((&v[0] + &v[1])?))?;
    // Once per step.
    part("embedding gather", 1, &[e], &|v| Ok(v[0].index_select(&flat_input, 0)?))?;
    part("lm_head matmul [B*T,H]x[H,V]", 1, &[&hidden_final, e], &|v| Ok(linear(&v[0], &v[1])?))?;
    part("masked CE (log_softmax over V)", 1, &[&logits], &|v| {
        let (sum, _) = masked_cross_entropy(&v[0], &t.target, &t.mask)?;
        Ok((sum / loss_tokens as f64)?)
    })?;
    // What the fused kernels replaced: the same two parts from composed candle ops.
    part("composed: mask add + softmax", nl, &[&scores], &|v| Ok(composed::masked_softmax(&v[0], &bias, scale)?))?;
    part("composed: masked CE", 1, &[&logits], &|v| {
        Ok((composed::masked_token_ce(&v[0], &t.target, &t.mask)?.sum_all()? / loss_tokens as f64)?)
    })?;
    Ok(Value::Array(
        parts
            .into_iter()
            .map(|(name, count, (f, bw, mem))| json!({"part": name, "count": count, "forward_s": f, "backward_s": bw, "held_mib": mem}))
            .collect(),
    ))
}

// ---------------------------------------------------------------------------------------------
// The driver.

fn run_json(mut cmd: Command, what: &str) -> Result<Value> {
    let out = cmd.stderr(std::process::Stdio::inherit()).output().with_context(|| format!("cannot start {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rev().find(|l| l.starts_with('{')).with_context(|| format!("{what} printed no JSON"))?;
    Ok(serde_json::from_str(line)?)
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

fn main() -> Result<()> {
    if let Ok(dir) = std::env::var(WORKER_ENV) {
        return worker(Path::new(&dir));
    }
    let rows = env_usize("BENCH_ROWS", 4);
    let seq = env_usize("BENCH_SEQ", 512);
    let steps = env_usize("BENCH_STEPS", 5).max(1);
    let warmup = env_usize("BENCH_WARMUP", 1).min(steps - 1);
    let gguf = smollm2_gguf();

    // The student, written as an HF folder, and the batch.
    // BENCH_DIR keeps the folder and batch (to rerun one side by hand: TRAIN_BENCH_WORKER=DIR
    // for candle, bench/train_torch.py --model DIR/model --batch DIR/batch.json for PyTorch).
    let tmp = tempfile::tempdir()?;
    let dir_path = std::env::var("BENCH_DIR").map(PathBuf::from).unwrap_or_else(|_| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir_path)?;
    let dir = dir_path.as_path();
    let (cfg, student_params) = {
        let (cfg, tensors) = read_gguf_as_hf(&gguf)?;
        let model = Llama::from_tensors(cfg, tensors, DType::F32, &Device::Cpu)?.keep_layers(&KEEP)?;
        let tok = ModelTokenizer::from_metadata(&GgufMetadata::read(&gguf)?)?;
        write_folder(&dir.join("model"), model.config(), &model.named_tensors()?, &tok, None)?;
        (model.config().clone(), model.num_params())
    };
    let batch = make_batch(rows, seq, cfg.vocab_size);
    write_batch(&batch, &dir.join("batch.json"))?;
    let real: usize = batch.segments.iter().filter(|s| **s > 0).count();
    let threads = threads();
    eprintln!(
        "student: SmolLM2-135M-Instruct layers {KEEP:?}, {:.1} M parameters, f32; batch {rows}×{seq} ({real} non-padding tokens, \
         {} loss tokens); {steps} steps ({warmup} warmup), {threads} threads",
        student_params as f64 / 1e6,
        batch.mask.iter().sum::<f32>()
    );

    let extra_env: Vec<(String, String)> = std::env::var("BENCH_WORKER_ENV")
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
        .collect();
    let mut candle = Command::new(std::env::current_exe()?);
    candle.env(WORKER_ENV, dir).env("RAYON_NUM_THREADS", threads.to_string()).envs(extra_env.iter().cloned());
    let candle = run_json(candle, "the candle worker")?;

    let python = venv_python("TORCH_PYTHON", "torch-venv");
    let script = repo_root().join("bench/train_torch.py");
    let mut torch_runs: Vec<Value> = Vec::new();
    if python.exists() {
        let variants: &[&str] = if env_usize("BENCH_SDPA", 1) != 0 { &["math", "sdpa"] } else { &["math"] };
        for (i, attn) in variants.iter().enumerate() {
            let mut cmd = Command::new(&python);
            cmd.envs(extra_env.iter().cloned()).arg(&script)
                .arg("--model")
                .arg(dir.join("model"))
                .arg("--batch")
                .arg(dir.join("batch.json"))
                .args(["--steps", &steps.to_string(), "--warmup", &warmup.to_string()])
                .args(["--lr", &LR.to_string(), "--max-grad-norm", &MAX_GRAD_NORM.to_string()])
                .args(["--threads", &threads.to_string(), "--attn", attn]);
            if i == 0 && env_usize("BENCH_PROFILE", 1) != 0 {
                cmd.arg("--components");
            }
            match run_json(cmd, &format!("bench/train_torch.py --attn {attn}")) {
                Ok(v) => torch_runs.push(v),
                Err(e) => eprintln!("PyTorch side ({attn}) failed: {e:#}"),
            }
        }
    } else {
        eprintln!("PyTorch side skipped: {} missing (run bench/setup-torch.sh, or set TORCH_PYTHON)", python.display());
    }

    if !extra_env.is_empty() {
        println!("\n(both sides ran with BENCH_WORKER_ENV: {extra_env:?})");
    }
    report(&candle, &torch_runs, rows, seq, real, threads);
    Ok(())
}

fn report(candle: &Value, torch: &[Value], rows: usize, seq: usize, real: usize, threads: usize) {
    println!();
    println!("Training step, SmolLM2-135M-Instruct pruned to 8 layers, f32, batch {rows}×{seq} ({real} non-padding tokens), {threads} threads");
    println!(
        "{:<34} {:>9} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10} {:>13}",
        "implementation", "tokens/s", "step s", "fwd s", "bwd s", "opt s", "peak MiB", "fwd +MiB", "step-1 loss"
    );
    let row = |v: &Value| {
        let opt = f(v, "optimizer_s") + v["clip_s"].as_f64().unwrap_or(0.0);
        let fwd_mem = f(v, "heap_after_forward_mib") - f(v, "heap_after_load_mib");
        println!(
            "{:<34} {:>9.1} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>10.0} {:>10.0} {:>13.6}",
            v["impl"].as_str().unwrap_or("?"),
            f(v, "tokens_per_s"),
            f(v, "step_s"),
            f(v, "forward_s"),
            f(v, "backward_s"),
            opt,
            f(v, "peak_rss_mib"),
            fwd_mem,
            v["losses"][0].as_f64().unwrap_or(f64::NAN)
        );
    };
    row(candle);
    for t in torch {
        row(t);
    }
    println!("(fwd +MiB: memory allocated by the first forward and still held = activations kept for the backward)");
    println!();
    println!("Memory, MiB (malloc'd = glibc mallinfo2: allocated and not yet freed, above the process's own at its start)");
    let mut sides: Vec<&Value> = vec![candle];
    sides.extend(torch.iter());
    let mem_row = |label: &str, g: &dyn Fn(&Value) -> f64| {
        print!("  {label:<52}");
        for v in &sides {
            print!(" {:>10.0}", g(v));
        }
        println!();
    };
    print!("  {:<52}", "");
    for v in &sides {
        let name = v["impl"].as_str().unwrap_or("?");
        print!(" {:>10}", if name.starts_with("candle") { "candle" } else if name.contains("sdpa") { "torch sdpa" } else { "torch" });
    }
    println!();
    mem_row("RSS at start (torch: after `import torch`)", &|v| {
        if v["rss_after_import_mib"].is_number() { f(v, "rss_after_import_mib") } else { f(v, "rss_start_mib") }
    });
    mem_row("  of which CUDA libraries (PyPI's CUDA build)", &|v| v["cuda_libs_rss_mib"].as_f64().unwrap_or(0.0));
    mem_row("RSS after loading the model and batch", &|v| f(v, "rss_after_load_mib"));
    mem_row("malloc'd after loading", &|v| f(v, "heap_after_load_mib") - f(v, "heap_start_mib"));
    mem_row("malloc'd after step 1's forward", &|v| f(v, "heap_after_forward_mib") - f(v, "heap_start_mib"));
    mem_row("malloc'd after step 1's backward (candle: + graph)", &|v| f(v, "heap_after_backward_mib") - f(v, "heap_start_mib"));
    mem_row("malloc'd after step 1 (weights + AdamW m, v)", &|v| f(v, "heap_after_step_mib") - f(v, "heap_start_mib"));
    mem_row("peak RSS (VmHWM)", &|v| f(v, "peak_rss_mib"));
    println!("Per step (median): CPU seconds (both threads) and page faults");
    mem_row("user CPU s", &|v| f(v, "user_cpu_s"));
    mem_row("system CPU s (page faults: zeroing fresh memory)", &|v| f(v, "sys_cpu_s"));
    mem_row("minor page faults, thousands", &|v| f(v, "minor_faults") / 1000.0);
    if let Some(t) = torch.first() {
        let speed = f(candle, "tokens_per_s") / f(t, "tokens_per_s");
        let mem = f(candle, "peak_rss_mib") / f(t, "peak_rss_mib");
        let base = f(t, "rss_after_import_mib");
        let cuda = f(t, "cuda_libs_rss_mib");
        let mem_net = (f(candle, "peak_rss_mib") - f(candle, "rss_start_mib")) / (f(t, "peak_rss_mib") - base);
        let l1 = (candle["losses"][0].as_f64().unwrap_or(f64::NAN) - t["losses"][0].as_f64().unwrap_or(f64::NAN)).abs();
        println!();
        println!("against {} (target: tokens/s ≥ 1.0×, peak RSS ≤ 1.0×):", t["impl"].as_str().unwrap_or("torch"));
        println!("  tokens/s   candle/torch = {speed:.2}×  {}", if speed >= 1.0 { "(met)" } else { "(NOT met)" });
        println!("  peak RSS   candle/torch = {mem:.2}×  {}", if mem <= 1.0 { "(met)" } else { "(NOT met)" });
        println!(
            "  peak RSS above each process's start (torch: after `import torch`, {base:.0} MiB of which {cuda:.0} MiB are CUDA \
             libraries a CPU build would not load): {mem_net:.2}×"
        );
        println!("  step-1 loss |candle − torch| = {l1:.2e}");
        let n = candle["losses"].as_array().map_or(0, |a| a.len()).min(t["losses"].as_array().map_or(0, |a| a.len()));
        let worst = (0..n)
            .map(|i| (candle["losses"][i].as_f64().unwrap() - t["losses"][i].as_f64().unwrap()).abs())
            .fold(0.0, f64::max);
        println!("  all {n} steps' losses: max |candle − torch| = {worst:.2e}");
        for s in torch.iter().skip(1) {
            println!(
                "  against {}: tokens/s {:.2}×, peak RSS {:.2}×",
                s["impl"].as_str().unwrap_or("?"),
                f(candle, "tokens_per_s") / f(s, "tokens_per_s"),
                f(candle, "peak_rss_mib") / f(s, "peak_rss_mib")
            );
        }
    }
    // The part-by-part timings.
    let parts = candle["components"].as_array().cloned().unwrap_or_default();
    if parts.is_empty() {
        return;
    }
    let torch_parts: BTreeMap<String, Value> = torch
        .first()
        .and_then(|t| t["components"].as_array())
        .map(|a| a.iter().map(|p| (p["part"].as_str().unwrap_or("").to_string(), p.clone())).collect())
        .unwrap_or_default();
    println!();
    println!("Where a step's time goes (each part timed alone, forward + backward, × its count per step; held: MiB its forward");
    println!("graph keeps for the backward, once):");
    println!(
        "{:<38} {:>3} {:>8} {:>8} {:>8} {:>6} {:>8} {:>8} {:>8} {:>6} {:>7} {:>7}",
        "part", "×", "candle f", "candle b", "candle", "%step", "torch f", "torch b", "torch", "c/t", "c held", "t held"
    );
    let (mut csum, mut tsum) = (0.0, 0.0);
    let cstep = f(candle, "step_s");
    let mut whatif = Vec::new();
    for p in &parts {
        let name = p["part"].as_str().unwrap_or("?");
        if name.starts_with("composed:") {
            whatif.push(p.clone());
            continue;
        }
        let n = p["count"].as_f64().unwrap_or(1.0);
        let (cf, cb) = (f(p, "forward_s") * n, f(p, "backward_s") * n);
        csum += cf + cb;
        let tp = torch_parts.get(name);
        let (tf, tb) = tp.map_or((f64::NAN, f64::NAN), |q| (f(q, "forward_s") * n, f(q, "backward_s") * n));
        if tf.is_finite() {
            tsum += tf + tb;
        }
        println!(
            "{:<38} {:>3} {:>8.3} {:>8.3} {:>8.3} {:>5.1}% {:>8.3} {:>8.3} {:>8.3} {:>5.2}× {:>7.0} {:>7.0}",
            name,
            n,
            cf,
            cb,
            cf + cb,
            100.0 * (cf + cb) / cstep,
            tf,
            tb,
            tf + tb,
            (cf + cb) / (tf + tb),
            f(p, "held_mib"),
            tp.map_or(f64::NAN, |q| f(q, "held_mib"))
        );
    }
    let c_opt = f(candle, "optimizer_s") + f(candle, "clip_s");
    let t_opt = torch.first().map_or(f64::NAN, |t| f(t, "optimizer_s"));
    println!(
        "{:<38} {:>3} {:>8} {:>8} {:>8.3} {:>5.1}% {:>8} {:>8} {:>8.3} {:>5.2}×",
        "clip + AdamW (from the run)", 1, "", "", c_opt, 100.0 * c_opt / cstep, "", "", t_opt, c_opt / t_opt
    );
    let tstep = torch.first().map_or(f64::NAN, |t| f(t, "step_s"));
    println!(
        "{:<38} {:>3} {:>8} {:>8} {:>8.3} {:>5.1}% {:>8} {:>8} {:>8.3}",
        "sum of parts", "", "", "", csum + c_opt, 100.0 * (csum + c_opt) / cstep, "", "", tsum + t_opt
    );
    println!("{:<38} {:>3} {:>8} {:>8} {:>8.3} {:>6} {:>8} {:>8} {:>8.3}", "measured step", "", "", "", cstep, "", "", "", tstep);
    println!(
        "(candle: clip {:.3} s + AdamW {:.3} s; the step's time the parts do not account for is the whole graph's extra: gradient \
         accumulation where a tensor feeds several ops, bigger working set)",
        f(candle, "clip_s"),
        f(candle, "optimizer_s")
    );
    if !whatif.is_empty() {
        println!();
        println!("The fused kernels (trainer/src/ops.rs) against the composed candle ops they replace:");
        for p in &whatif {
            let name = p["part"].as_str().unwrap_or("?");
            let base_name = if name.contains("softmax") { "mask add + softmax [B,H,T,T]" } else { "masked CE (log_softmax over V)" };
            let Some(base) = parts.iter().find(|q| q["part"] == base_name) else { continue };
            let n = p["count"].as_f64().unwrap_or(1.0);
            let fused = (f(base, "forward_s") + f(base, "backward_s")) * n;
            let composed = (f(p, "forward_s") + f(p, "backward_s")) * n;
            println!(
                "  {base_name}: fused {fused:.3} s per step, {name} {composed:.3} s (fusing saves {:.3} s = {:.1}% of the step); \
                 holds {:.0} MiB instead of {:.0} MiB (×{n})",
                composed - fused,
                100.0 * (composed - fused) / cstep,
                f(base, "held_mib"),
                f(p, "held_mib")
            );
        }
    }
}
