//! The student: a Llama-family decoder (SmolLM2, Llama, Mistral; no biases) written for
//! training. RMSNorm → attention (RoPE, grouped-query) → RMSNorm → SwiGLU per layer, final
//! RMSNorm, tied or separate output head. Tensor names, shapes ([out, in]) and the RoPE
//! convention (HF `rotate_half`) are those of the HF checkpoint, so weights load from and save
//! to HF folders (and GGUF via `read_gguf_as_hf`) without renaming.
//!
//! Every op here is an ordinary differentiable candle op, except the attention softmax and the
//! cross-entropy, which are our own fused kernels with a backward (`crate::ops`: they keep one
//! tensor for the backward where the composed ops keep five). candle-nn's fused kernels
//! (`ops::rms_norm`, `RmsNorm`, `LayerNorm`, `softmax_last_dim`, `rotary_emb::rope*`) have no
//! backward pass and silently cut the gradient, so they are deliberately not used.
//!
//! Packing: a row may hold several examples. `segments` gives each token its example id and
//! `positions` restart at 0 at each example; attention is causal and confined to the token's
//! own segment, so packed examples see exactly what they would see alone.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use server::model::hf::{read_gguf_as_hf, HfFolder, HfLlamaConfig, NamedTensor};

use crate::ops;

/// One decoder layer's parameters.
struct Layer {
    input_layernorm: Var,
    q_proj: Var,
    k_proj: Var,
    v_proj: Var,
    o_proj: Var,
    post_attention_layernorm: Var,
    gate_proj: Var,
    up_proj: Var,
    down_proj: Var,
}

impl Layer {
    /// (HF name suffix, parameter), in a fixed order.
    fn named(&self) -> [(&'static str, &Var); 9] {
        [
            ("input_layernorm.weight", &self.input_layernorm),
            ("self_attn.q_proj.weight", &self.q_proj),
            ("self_attn.k_proj.weight", &self.k_proj),
            ("self_attn.v_proj.weight", &self.v_proj),
            ("self_attn.o_proj.weight", &self.o_proj),
            ("post_attention_layernorm.weight", &self.post_attention_layernorm),
            ("mlp.gate_proj.weight", &self.gate_proj),
            ("mlp.up_proj.weight", &self.up_proj),
            ("mlp.down_proj.weight", &self.down_proj),
        ]
    }
}

/// A Llama-family causal LM whose parameters are candle `Var`s (trainable).
pub struct Llama {
    cfg: HfLlamaConfig,
    dtype: DType,
    device: Device,
    embed_tokens: Var,
    layers: Vec<Layer>,
    norm: Var,
    /// `None` when the output head is tied to `embed_tokens`.
    lm_head: Option<Var>,
}

/// Every parameter name and shape a config implies, in HF naming.
fn expected_shapes(cfg: &HfLlamaConfig) -> BTreeMap<String, Vec<usize>> {
    let (h, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (q, kv) = (cfg.num_attention_heads * cfg.head_dim(), cfg.kv_heads() * cfg.head_dim());
    let mut m = BTreeMap::new();
    m.insert("model.embed_tokens.weight".to_string(), vec![v, h]);
    m.insert("model.norm.weight".to_string(), vec![h]);
    if !cfg.tie_word_embeddings {
        m.insert("lm_head.weight".to_string(), vec![v, h]);
    }
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        m.insert(format!("{p}.input_layernorm.weight"), vec![h]);
        m.insert(format!("{p}.self_attn.q_proj.weight"), vec![q, h]);
        m.insert(format!("{p}.self_attn.k_proj.weight"), vec![kv, h]);
        m.insert(format!("{p}.self_attn.v_proj.weight"), vec![kv, h]);
        m.insert(format!("{p}.self_attn.o_proj.weight"), vec![h, q]);
        m.insert(format!("{p}.post_attention_layernorm.weight"), vec![h]);
        m.insert(format!("{p}.mlp.gate_proj.weight"), vec![f, h]);
        m.insert(format!("{p}.mlp.up_proj.weight"), vec![f, h]);
        m.insert(format!("{p}.mlp.down_proj.weight"), vec![h, f]);
    }
    m
}

impl Llama {
    /// Builds the model from HF-named f32 tensors (from `read_gguf_as_hf` or an HF folder).
    /// Every tensor the config implies must be present with its exact shape. Ignored: a
    /// `lm_head.weight` when the embeddings are tied (some checkpoints store the copy) and
    /// `rotary_emb.inv_freq` buffers; any other name is an error, since silently dropping a
    /// weight would train a different model.
    pub fn from_tensors(cfg: HfLlamaConfig, tensors: Vec<NamedTensor>, dtype: DType, device: &Device) -> Result<Self> {
        cfg.check()?;
        let expected = expected_shapes(&cfg);
        let mut vars: BTreeMap<String, Var> = BTreeMap::new();
        for t in tensors {
            let Some(shape) = expected.get(&t.name) else {
                if (t.name == "lm_head.weight" && cfg.tie_word_embeddings) || t.name.ends_with("rotary_emb.inv_freq") {
                    continue;
                }
                bail!("unexpected tensor `{}` for a {}-layer Llama config", t.name, cfg.num_hidden_layers);
            };
            ensure!(&t.shape == shape, "tensor `{}` has shape {:?}, the config implies {:?}", t.name, t.shape, shape);
            ensure!(t.values.len() == shape.iter().product::<usize>(), "tensor `{}`: value count does not match its shape", t.name);
            let tensor = Tensor::from_vec(t.values, shape.as_slice(), &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?;
            vars.insert(t.name, Var::from_tensor(&tensor)?);
        }
        if let Some(missing) = expected.keys().find(|n| !vars.contains_key(*n)) {
            bail!("tensor `{missing}` is missing");
        }
        Self::assemble(cfg, vars, dtype, device)
    }

    /// Loads an HF folder (`config.json` + safetensors) or a GGUF file.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let (cfg, tensors) = if path.is_dir() {
            let folder = HfFolder::open(path)?;
            let st = folder.tensors()?;
            let mut names: Vec<String> = st.names().into_keys().collect();
            names.sort();
            let mut tensors = Vec::with_capacity(names.len());
            for name in names {
                let (values, shape) = st.f32(&name)?;
                tensors.push(NamedTensor { name, shape, values });
            }
            (folder.config.clone(), tensors)
        } else {
            read_gguf_as_hf(path)?
        };
        Self::from_tensors(cfg, tensors, dtype, device).with_context(|| format!("{}", path.display()))
    }

    /// A freshly initialised model, as HF initialises Llama: matrices (embeddings included)
    /// ~ N(0, 0.02²), norm weights 1. Deterministic for a given seed (values are drawn in
    /// parameter-name order on the CPU, then moved to `device`).
    pub fn random(cfg: HfLlamaConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        cfg.check()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut vars = BTreeMap::new();
        for (name, shape) in expected_shapes(&cfg) {
            let n: usize = shape.iter().product();
            let values: Vec<f64> = if shape.len() == 1 {
                vec![1.0; n]
            } else {
                // Box–Muller, so only `rand` itself is needed.
                (0..n)
                    .map(|_| {
                        let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
                        let u2: f64 = rng.random::<f64>();
                        0.02 * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
                    })
                    .collect()
            };
            let t = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?;
            vars.insert(name, Var::from_tensor(&t)?);
        }
        Self::assemble(cfg, vars, dtype, device)
    }

    fn assemble(cfg: HfLlamaConfig, mut vars: BTreeMap<String, Var>, dtype: DType, device: &Device) -> Result<Self> {
        let mut take = |n: &str| vars.remove(n).with_context(|| format!("tensor `{n}` is missing"));
        let embed_tokens = take("model.embed_tokens.weight")?;
        let norm = take("model.norm.weight")?;
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(take("lm_head.weight")?) };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let mut t = |s: &str| take(&format!("model.layers.{i}.{s}"));
            layers.push(Layer {
                input_layernorm: t("input_layernorm.weight")?,
                q_proj: t("self_attn.q_proj.weight")?,
                k_proj: t("self_attn.k_proj.weight")?,
                v_proj: t("self_attn.v_proj.weight")?,
                o_proj: t("self_attn.o_proj.weight")?,
                post_attention_layernorm: t("post_attention_layernorm.weight")?,
                gate_proj: t("mlp.gate_proj.weight")?,
                up_proj: t("mlp.up_proj.weight")?,
                down_proj: t("mlp.down_proj.weight")?,
            });
        }
        Ok(Self { cfg, dtype, device: device.clone(), embed_tokens, layers, norm, lm_head })
    }

    /// A student made of the listed decoder layers (strictly increasing indices), renumbered
    /// 0..n; embeddings, final norm and head are kept. The parameters are shared with `self`
    /// (which is consumed), not copied.
    pub fn keep_layers(self, keep: &[usize]) -> Result<Self> {
        let n = self.layers.len();
        ensure!(!keep.is_empty(), "keep_layers: at least one layer must be kept");
        for (j, &i) in keep.iter().enumerate() {
            ensure!(i < n, "keep_layers: layer index {i} is out of range (the model has {n} layers, 0..{})", n - 1);
            if j > 0 && i <= keep[j - 1] {
                bail!("keep_layers: layer indices must be strictly increasing, got {i} after {}", keep[j - 1]);
            }
        }
        let Self { mut cfg, dtype, device, embed_tokens, layers, norm, lm_head } = self;
        let mut slots: Vec<Option<Layer>> = layers.into_iter().map(Some).collect();
        let layers = keep.iter().map(|&i| slots[i].take().expect("indices are unique")).collect();
        cfg.num_hidden_layers = keep.len();
        Ok(Self { cfg, dtype, device, embed_tokens, layers, norm, lm_head })
    }

    pub fn config(&self) -> &HfLlamaConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every trainable parameter under its HF name, sorted by name (the order checkpoints and
    /// the optimizer rely on). A tied head appears once, as `model.embed_tokens.weight`.
    pub fn params(&self) -> Vec<(String, Var)> {
        let mut out = vec![
            ("model.embed_tokens.weight".to_string(), self.embed_tokens.clone()),
            ("model.norm.weight".to_string(), self.norm.clone()),
        ];
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), h.clone()));
        }
        for (i, layer) in self.layers.iter().enumerate() {
            for (suffix, v) in layer.named() {
                out.push((format!("model.layers.{i}.{suffix}"), v.clone()));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Total number of parameter values.
    pub fn num_params(&self) -> usize {
        self.params().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The parameters as f32 host tensors in HF naming, for `write_folder` / checkpoints.
    pub fn named_tensors(&self) -> Result<Vec<NamedTensor>> {
        self.params()
            .into_iter()
            .map(|(name, v)| {
                let t = v.as_tensor();
                let shape = t.dims().to_vec();
                let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                Ok(NamedTensor { name, shape, values })
            })
            .collect()
    }

    /// Logits [B, T, V] for token ids `input` [B, T] (u32). `positions` [B, T] (u32) are the
    /// RoPE positions, restarting at 0 for each packed example; `segments` [B, T] (u32) the
    /// example id of each token: a token attends to the tokens at or before it with the same
    /// segment id. Padding may share segment 0 (it then attends only to padding; the caller
    /// masks it out of the loss).
    pub fn forward(&self, input: &Tensor, positions: &Tensor, segments: &Tensor) -> Result<Tensor> {
        self.forward_impl(input, positions, segments, true)
    }

    /// [`Llama::forward`] without recording the autograd graph (evaluation): the weights are
    /// used detached, so each layer's intermediates are freed as soon as the next one has run
    /// instead of being kept for a backward pass that never comes.
    pub fn forward_no_grad(&self, input: &Tensor, positions: &Tensor, segments: &Tensor) -> Result<Tensor> {
        self.forward_impl(input, positions, segments, false)
    }

    fn forward_impl(&self, input: &Tensor, positions: &Tensor, segments: &Tensor, track: bool) -> Result<Tensor> {
        let w = |v: &Var| if track { v.as_tensor().clone() } else { v.as_tensor().detach() };
        let (b, t) = input.dims2().context("input must be [batch, time] token ids")?;
        ensure!(positions.dims() == [b, t], "positions must be [{b}, {t}], got {:?}", positions.dims());
        ensure!(segments.dims() == [b, t], "segments must be [{b}, {t}], got {:?}", segments.dims());
        let cfg = &self.cfg;

        let mut x = w(&self.embed_tokens).index_select(&input.flatten_all()?, 0)?; // [B·T, H]
        let (cos, sin) = self.rope_tables(positions)?;
        let bias = self.attention_bias(segments, t)?;
        for layer in &self.layers {
            let a = self.attention(layer, &rms_norm(&x, &w(&layer.input_layernorm), cfg.rms_norm_eps)?, b, t, &cos, &sin, &bias, &w)?;
            x = (x + a)?;
            let m = mlp(layer, &rms_norm(&x, &w(&layer.post_attention_layernorm), cfg.rms_norm_eps)?, &w)?;
            x = (x + m)?;
        }
        let x = rms_norm(&x, &w(&self.norm), cfg.rms_norm_eps)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        let logits = linear(&x, &w(head))?; // [B·T, V]
        Ok(logits.reshape((b, t, cfg.vocab_size))?)
    }

    /// cos/sin [B, 1, T, head_dim] for the given positions, HF style: angle = pos · θ^(-2j/d)
    /// for j < d/2, repeated for both halves. Computed in f32 (f64 for an f64 model) like HF,
    /// then cast to the model dtype.
    fn rope_tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let d = self.cfg.head_dim();
        let calc = if self.dtype == DType::F64 { DType::F64 } else { DType::F32 };
        let theta = self.cfg.rope_theta as f64;
        let inv_freq: Vec<f64> = (0..d / 2).map(|j| 1.0 / theta.powf((2 * j) as f64 / d as f64)).collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, 1, d / 2), &self.device)?.to_dtype(calc)?;
        let pos = positions.to_dtype(calc)?.unsqueeze(2)?; // [B, T, 1]
        let freqs = pos.broadcast_mul(&inv_freq)?; // [B, T, d/2]
        let emb = Tensor::cat(&[&freqs, &freqs], 2)?; // [B, T, d]
        let cos = emb.cos()?.to_dtype(self.dtype)?.unsqueeze(1)?;
        let sin = emb.sin()?.to_dtype(self.dtype)?.unsqueeze(1)?;
        Ok((cos, sin))
    }

    /// Additive attention bias [B, 1, T, T]: 0 where key j ≤ query i and both share a
    /// segment, −∞ elsewhere. Every query sees at least itself, so no softmax row is empty.
    fn attention_bias(&self, segments: &Tensor, t: usize) -> Result<Tensor> {
        let b = segments.dim(0)?;
        let same = segments.unsqueeze(2)?.broadcast_eq(&segments.unsqueeze(1)?)?; // [B, T, T] u8
        let causal = Tensor::tril2(t, DType::U8, &self.device)?.broadcast_as((b, t, t))?;
        let allowed = (same * causal)?;
        let dt = softmax_dtype(self.dtype);
        let zero = Tensor::zeros((b, t, t), dt, &self.device)?;
        let neg = Tensor::full(f32::NEG_INFINITY, (b, t, t), &self.device)?.to_dtype(dt)?;
        Ok(allowed.where_cond(&zero, &neg)?.unsqueeze(1)?)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        l: &Layer,
        x: &Tensor,
        b: usize,
        t: usize,
        cos: &Tensor,
        sin: &Tensor,
        bias: &Tensor,
        w: &dyn Fn(&Var) -> Tensor,
    ) -> Result<Tensor> {
        let (nh, nkv, d) = (self.cfg.num_attention_heads, self.cfg.kv_heads(), self.cfg.head_dim());
        // [B·T, n·d] → [B, n, T, d]
        let heads = |y: Tensor, n: usize| -> Result<Tensor> { Ok(y.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?) };
        let q = ops::rope_heads(&linear(x, &w(&l.q_proj))?, (b, t, nh, d), cos, sin)?;
        let k = ops::rope_heads(&linear(x, &w(&l.k_proj))?, (b, t, nkv, d), cos, sin)?;
        let v = heads(linear(x, &w(&l.v_proj))?, nkv)?;
        // Grouped-query attention (query head h uses KV head h / (nh / nkv), as HF's
        // repeat_kv) without copying the KV heads: see ops::attention_probs.
        let dt = softmax_dtype(self.dtype);
        let scale = 1.0 / (d as f64).sqrt();
        let probs = if dt == self.dtype {
            ops::attention_probs(&q, &k, bias, scale)?
        } else {
            let k = ops::composed::repeat_kv(&k, nh / nkv)?;
            ops::masked_softmax(&q.matmul(&k.t()?)?.to_dtype(dt)?, bias, scale)?.to_dtype(self.dtype)?
        };
        let out = ops::attention_values(&probs, &v)?; // [B, nh, T, d]
        let out = out.transpose(1, 2)?.reshape((b * t, nh * d))?;
        linear(&out, &w(&l.o_proj))
    }
}

/// Half-precision models normalise and take softmax in f32, as HF does.
fn softmax_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// `x · Wᵀ` for an HF [out, in] weight; `x` is [N, in].
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?)
}

/// HF LlamaRMSNorm: x / sqrt(mean(x²) + eps) · w, computed in f32 for half-precision input.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let dt = x.dtype();
    if softmax_dtype(dt) == dt {
        return Ok(ops::rms_norm(x, w, eps as f64)?);
    }
    let xf = x.to_dtype(softmax_dtype(dt))?;
    let inv = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?.sqrt()?.recip()?;
    let normed = xf.broadcast_mul(&inv)?.to_dtype(dt)?;
    Ok(normed.broadcast_mul(w)?)
}

/// SwiGLU: down(silu(gate(x)) ⊙ up(x)).
fn mlp(l: &Layer, x: &Tensor, w: &dyn Fn(&Var) -> Tensor) -> Result<Tensor> {
    let g = linear(x, &w(&l.gate_proj))?;
    let u = linear(x, &w(&l.up_proj))?;
    linear(&ops::silu_mul(&g, &u)?, &w(&l.down_proj))
}

/// Summed next-token cross-entropy over the positions where `mask` is non-zero (a mask value
/// weights its token), and the mask's sum, so a caller can divide by the token count of a
/// whole gradient-accumulation step rather than per micro-batch. `logits` [B, T, V] (any float
/// dtype; computed in f32, or f64 for f64 logits), `targets` [B, T] u32 (must be valid ids
/// even where masked), `mask` [B, T] float. Stable (log-sum-exp with the max subtracted).
pub fn masked_cross_entropy(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<(Tensor, f64)> {
    let (b, t, _v) = logits.dims3().context("logits must be [batch, time, vocab]")?;
    ensure!(targets.dims() == [b, t], "targets must be [{b}, {t}], got {:?}", targets.dims());
    ensure!(mask.dims() == [b, t], "mask must be [{b}, {t}], got {:?}", mask.dims());
    let dt = if logits.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    let loss = ops::masked_token_ce(&logits.to_dtype(dt)?, targets, mask)?.sum_all()?;
    let count = mask.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    Ok((loss, count))
}
