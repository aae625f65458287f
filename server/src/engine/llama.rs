//! A Llama-family decoder (SmolLM2, Llama, Qwen2-style: RMSNorm, RoPE, GQA, SwiGLU, tied
//! embeddings) run straight from a GGUF file, for batched greedy decoding on the CPU.
//!
//! One forward call takes chunks of tokens from any number of sequences (a whole prompt, or
//! one new token each) and runs them as one batch through every weight matrix.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;
use rayon::prelude::*;

use super::attention::{attend, VBLOCK};
use super::quant::{Format, Q8Rows, QMatrix};

/// Model shape, from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub rope_base: f32,
    pub eps: f32,
    pub context: usize,
}

impl LlamaConfig {
    fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: QMatrix,
    wk: QMatrix,
    wv: QMatrix,
    wo: QMatrix,
    ffn_norm: Vec<f32>,
    gate: QMatrix,
    up: QMatrix,
    down: QMatrix,
}

/// How the engine does its arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// llama.cpp's: weights in their file format (HF folders: Q8_0), activations rounded to
    /// 8-bit blocks before each product, keys/values/queries and attention weights in f16.
    /// Fast and small; logits carry a few tenths of noise, which flips near-tie tokens.
    #[default]
    Quantized,
    /// Weights dequantized to f32 at load (4 bytes per weight), f32 activations and cache:
    /// the model's exact distribution, e.g. to compare with a trainer or for soft labels.
    F32,
}

impl std::str::FromStr for Precision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "quantized" => Ok(Precision::Quantized),
            "f32" => Ok(Precision::F32),
            other => bail!("precision `{other}` is unknown; use quantized or f32"),
        }
    }
}

pub struct Llama {
    pub cfg: LlamaConfig,
    pub precision: Precision,
    embed: QMatrix,
    /// `None`: the output projection is tied to the embeddings.
    output: Option<QMatrix>,
    norm: Vec<f32>,
    layers: Vec<Layer>,
    /// cos/sin of position·θ_i for i < head_dim/2, per position.
    rope: Vec<(f32, f32)>,
}

/// Keys and values of one sequence, for every layer: keys `[pos][kv_dim]`, values in blocks
/// of 32 positions `[block][kv_dim][32]` (see `attention`).
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    pub len: usize,
}

impl KvCache {
    pub fn new(cfg: &LlamaConfig) -> Self {
        KvCache { k: vec![Vec::new(); cfg.layers], v: vec![Vec::new(); cfg.layers], len: 0 }
    }
}

/// Tokens of one sequence for one forward call.
pub struct Chunk<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
    /// Logits for every token of the chunk (teacher forcing, soft labels) or only the last.
    pub all_logits: bool,
}

fn md_u32(c: &Content, key: &str) -> anyhow::Result<u32> {
    c.metadata
        .get(key)
        .ok_or_else(|| anyhow!("GGUF metadata has no `{key}`"))?
        .to_u32()
        .map_err(|e| anyhow!("`{key}`: {e}"))
}

fn md_f32(c: &Content, key: &str) -> Option<f32> {
    c.metadata.get(key).and_then(|v| v.to_f32().ok())
}

impl Llama {
    /// Loads a Llama-architecture GGUF whose matrices are Q4_1, Q8_0 or F32.
    pub fn load(path: &Path, precision: Precision) -> anyhow::Result<Self> {
        let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let content = Content::read(&mut f).map_err(|e| anyhow!("{} is not a readable GGUF: {e}", path.display()))?;
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "llama" {
            bail!("architecture `{arch}` is not Llama-family; the native engine covers `llama` GGUFs");
        }
        let p = |k: &str| format!("llama.{k}");
        let hidden = md_u32(&content, &p("embedding_length"))? as usize;
        let heads = md_u32(&content, &p("attention.head_count"))? as usize;
        let cfg = LlamaConfig {
            hidden,
            layers: md_u32(&content, &p("block_count"))? as usize,
            heads,
            kv_heads: md_u32(&content, &p("attention.head_count_kv")).unwrap_or(heads as u32) as usize,
            head_dim: md_u32(&content, &p("rope.dimension_count")).map(|v| v as usize).unwrap_or(hidden / heads),
            ffn: md_u32(&content, &p("feed_forward_length"))? as usize,
            vocab: 0,
            rope_base: md_f32(&content, &p("rope.freq_base")).unwrap_or(10_000.0),
            eps: md_f32(&content, &p("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
            context: md_u32(&content, &p("context_length")).unwrap_or(4096) as usize,
        };
        if cfg.head_dim * cfg.heads != cfg.hidden || cfg.heads % cfg.kv_heads != 0 {
            bail!("unsupported head layout: {cfg:?}");
        }
        let has_output = content.tensor_infos.contains_key("output.weight");
        Self::assemble(cfg, precision, has_output, &mut |name| {
            let m = read_matrix(&content, &mut f, name)?;
            Ok(if precision == Precision::F32 { m.to_f32() } else { m })
        })
    }

    /// Loads an HF folder (Llama-family `config.json` + safetensors). Quantized: matrices
    /// become Q8_0 at load (8.5 bits per weight, so f32/bf16 checkpoints decode at the speed of
    /// the engine's integer kernels); F32: kept as f32. Norms stay f32; Q/K rows are put in
    /// GGUF's rotary order.
    pub fn load_hf(folder: &crate::model::hf::HfFolder, precision: Precision) -> anyhow::Result<Self> {
        use crate::model::hf::{hf_tensor_name, qk_hf_to_gguf};
        let c = &folder.config;
        let cfg = LlamaConfig {
            hidden: c.hidden_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            kv_heads: c.kv_heads(),
            head_dim: c.head_dim(),
            ffn: c.intermediate_size,
            vocab: 0,
            rope_base: c.rope_theta,
            eps: c.rms_norm_eps,
            context: c.max_position_embeddings,
        };
        let tensors = folder.tensors()?;
        let has_output = !c.tie_word_embeddings && tensors.has("lm_head.weight");
        let (heads, kv_heads) = (cfg.heads, cfg.kv_heads);
        Self::assemble(cfg, precision, has_output, &mut |gguf_name| {
            let name = hf_tensor_name(gguf_name).with_context(|| format!("no HF name for `{gguf_name}`"))?;
            let (mut w, shape) = tensors.f32(&name)?;
            match shape.as_slice() {
                [n] => QMatrix::new(1, *n, Format::F32, w.iter().flat_map(|v| v.to_le_bytes()).collect()),
                [rows, cols] if precision == Precision::F32 && cols % super::quant::QK != 0 => {
                    bail!("{rows}x{cols} matrix: columns not a multiple of {}", super::quant::QK)
                }
                [rows, cols] => {
                    if gguf_name.ends_with("attn_q.weight") {
                        w = qk_hf_to_gguf(&w, *cols, heads);
                    } else if gguf_name.ends_with("attn_k.weight") {
                        w = qk_hf_to_gguf(&w, *cols, kv_heads);
                    }
                    match precision {
                        Precision::Quantized => QMatrix::quantize_q8_0(*rows, *cols, &w),
                        Precision::F32 => Ok(QMatrix::from_f32(*rows, *cols, w)),
                    }
                }
                other => bail!("tensor `{name}` has shape {other:?}; expected 1 or 2 dimensions"),
            }
            .with_context(|| format!("tensor `{name}`"))
        })
    }

    /// Builds the model from tensors named as in GGUF.
    fn assemble(
        cfg: LlamaConfig,
        precision: Precision,
        has_output: bool,
        read: &mut dyn FnMut(&str) -> anyhow::Result<QMatrix>,
    ) -> anyhow::Result<Self> {
        let embed = read("token_embd.weight")?;
        let output = if has_output { Some(read("output.weight")?) } else { None };
        let norm = read("output_norm.weight")?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let n = |s: &str| format!("blk.{l}.{s}.weight");
            layers.push(Layer {
                attn_norm: vector(read(&n("attn_norm"))?)?,
                wq: read(&n("attn_q"))?,
                wk: read(&n("attn_k"))?,
                wv: read(&n("attn_v"))?,
                wo: read(&n("attn_output"))?,
                ffn_norm: vector(read(&n("ffn_norm"))?)?,
                gate: read(&n("ffn_gate"))?,
                up: read(&n("ffn_up"))?,
                down: read(&n("ffn_down"))?,
            });
        }
        let kv = cfg.kv_dim();
        for (l, layer) in layers.iter().enumerate() {
            let shapes = [
                ("attn_q", &layer.wq, cfg.hidden, cfg.hidden),
                ("attn_k", &layer.wk, kv, cfg.hidden),
                ("attn_v", &layer.wv, kv, cfg.hidden),
                ("attn_output", &layer.wo, cfg.hidden, cfg.hidden),
                ("ffn_gate", &layer.gate, cfg.ffn, cfg.hidden),
                ("ffn_up", &layer.up, cfg.ffn, cfg.hidden),
                ("ffn_down", &layer.down, cfg.hidden, cfg.ffn),
            ];
            for (name, m, rows, cols) in shapes {
                if (m.rows, m.cols) != (rows, cols) {
                    bail!("layer {l} {name}: shape {}x{} does not match the config ({rows}x{cols})", m.rows, m.cols);
                }
            }
        }
        let mut cfg = cfg;
        cfg.vocab = embed.rows;
        let mut model = Llama { cfg, precision, embed, output, norm: vector(norm)?, layers, rope: Vec::new() };
        model.extend_rope(4096.min(model.cfg.context.max(1)));
        Ok(model)
    }

    /// The rotation table, computed the way ggml does (f32, θ_i by repeated multiplication),
    /// so long sequences round exactly as llama.cpp's do.
    fn extend_rope(&mut self, positions: usize) {
        let half = self.cfg.head_dim / 2;
        let have = self.rope.len() / half.max(1);
        let theta_scale = self.cfg.rope_base.powf(-2.0 / self.cfg.head_dim as f32);
        for pos in have..positions {
            let mut theta = pos as f32;
            for _ in 0..half {
                self.rope.push((theta.cos(), theta.sin()));
                theta *= theta_scale;
            }
        }
    }

    /// Positions the rope table covers; longer sequences are refused.
    pub fn max_positions(&self) -> usize {
        self.rope.len() / (self.cfg.head_dim / 2)
    }

    /// Makes room for sequences up to `positions` long (at most the model's context).
    pub fn reserve_positions(&mut self, positions: usize) {
        self.extend_rope(positions.min(self.cfg.context));
    }

    /// Runs the chunks as one batch. Returns, per chunk, logits (vocab per row) for its last
    /// token, or for all its tokens when `all_logits`.
    pub fn forward(&self, chunks: &mut [Chunk<'_>]) -> anyhow::Result<Vec<Vec<f32>>> {
        let cfg = &self.cfg;
        let (d, kvd, hd) = (cfg.hidden, cfg.kv_dim(), cfg.head_dim);
        let f16 = self.precision == Precision::Quantized;
        let round = |x: f32| if f16 { round_f16(x) } else { x };
        // Row r of the batch: (chunk, position in its sequence).
        let mut rows: Vec<(usize, usize)> = Vec::new();
        for (c, ch) in chunks.iter().enumerate() {
            if ch.cache.len + ch.tokens.len() > self.max_positions() {
                bail!("sequence of {} tokens exceeds the context of {}", ch.cache.len + ch.tokens.len(), self.max_positions());
            }
            for (i, _) in ch.tokens.iter().enumerate() {
                rows.push((c, ch.cache.len + i));
            }
        }
        let t = rows.len();
        let mut x = vec![0f32; t * d];
        let mut r = 0;
        for ch in chunks.iter() {
            for &tok in ch.tokens {
                if tok as usize >= cfg.vocab {
                    bail!("token id {tok} outside the vocabulary of {}", cfg.vocab);
                }
                self.embed.dequantize_row(tok as usize, &mut x[r * d..(r + 1) * d]);
                r += 1;
            }
        }
        let mut xn = vec![0f32; t * d];
        let (mut q, mut k, mut v) = (vec![0f32; t * d], vec![0f32; t * kvd], vec![0f32; t * kvd]);
        let mut att = vec![0f32; t * d];
        let mut o = vec![0f32; t * d];
        let (mut g, mut u) = (vec![0f32; t * cfg.ffn], vec![0f32; t * cfg.ffn]);
        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, cfg.eps, &mut xn);
            let xq = Q8Rows::quantize(&xn, t, d);
            rayon::join(
                || layer.wq.matmul(&xq, &xn, &mut q),
                || rayon::join(|| layer.wk.matmul(&xq, &xn, &mut k), || layer.wv.matmul(&xq, &xn, &mut v)),
            );
            for (ri, &(_, pos)) in rows.iter().enumerate() {
                self.apply_rope(&mut q[ri * d..(ri + 1) * d], pos);
                self.apply_rope(&mut k[ri * kvd..(ri + 1) * kvd], pos);
            }
            // Append this layer's keys and values, then attend (caches are read-only below).
            // Quantized: like llama.cpp, keys, values, queries and attention weights go through
            // f16, so both implementations round alike and agree on near-ties.
            for (ri, &(c, _)) in rows.iter().enumerate() {
                let cache = &mut *chunks[c].cache;
                let pos = cache.k[li].len() / kvd;
                cache.k[li].extend(k[ri * kvd..(ri + 1) * kvd].iter().map(|x| round(*x)));
                let (blk, slot) = (pos / VBLOCK, pos % VBLOCK);
                if slot == 0 {
                    cache.v[li].resize((blk + 1) * kvd * VBLOCK, 0.0);
                }
                let base = blk * kvd * VBLOCK;
                for (c, x) in v[ri * kvd..(ri + 1) * kvd].iter().enumerate() {
                    cache.v[li][base + c * VBLOCK + slot] = round(*x);
                }
            }
            q.iter_mut().for_each(|x| *x = round(*x));
            let caches: Vec<&KvCache> = chunks.iter().map(|c| &*c.cache).collect();
            let group = cfg.heads / cfg.kv_heads;
            let scale = 1.0 / (hd as f32).sqrt();
            let head = |scores: &mut Vec<f32>, (i, out): (usize, &mut [f32])| {
                let (ri, h) = (i / cfg.heads, i % cfg.heads);
                let (c, pos) = rows[ri];
                let cache = caches[c];
                let qh = &q[ri * d + h * hd..ri * d + (h + 1) * hd];
                // Causal: positions 0..=pos.
                attend(f16, qh, &cache.k[li], &cache.v[li], pos + 1, h / group, kvd, scale, scores, out);
            };
            // A single decode row's heads are too little work to spread over threads.
            if t == 1 {
                let mut scores = Vec::new();
                att.chunks_mut(hd).enumerate().for_each(|item| head(&mut scores, item));
            } else {
                att.par_chunks_mut(hd).enumerate().for_each_init(Vec::new, head);
            }
            let aq = Q8Rows::quantize(&att, t, d);
            layer.wo.matmul(&aq, &att, &mut o);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);

            rms_norm(&x, &layer.ffn_norm, cfg.eps, &mut xn);
            let xq = Q8Rows::quantize(&xn, t, d);
            rayon::join(|| layer.gate.matmul(&xq, &xn, &mut g), || layer.up.matmul(&xq, &xn, &mut u));
            g.par_iter_mut().zip(u.par_iter()).for_each(|(a, b)| *a = *a / (1.0 + (-*a).exp()) * b);
            let hq = Q8Rows::quantize(&g, t, cfg.ffn);
            layer.down.matmul(&hq, &g, &mut o);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        }
        for ch in chunks.iter_mut() {
            ch.cache.len += ch.tokens.len();
        }
        // Logits only for the rows that need them.
        let mut want: Vec<usize> = Vec::new();
        let mut r = 0;
        for ch in chunks.iter() {
            let n = ch.tokens.len();
            if ch.all_logits {
                want.extend(r..r + n);
            } else if n > 0 {
                want.push(r + n - 1);
            }
            r += n;
        }
        let mut sel = vec![0f32; want.len() * d];
        for (i, &ri) in want.iter().enumerate() {
            sel[i * d..(i + 1) * d].copy_from_slice(&x[ri * d..(ri + 1) * d]);
        }
        let mut seln = vec![0f32; sel.len()];
        rms_norm(&sel, &self.norm, cfg.eps, &mut seln);
        let sq = Q8Rows::quantize(&seln, want.len(), d);
        let head = self.output.as_ref().unwrap_or(&self.embed);
        let mut logits = vec![0f32; want.len() * cfg.vocab];
        head.matmul(&sq, &seln, &mut logits);
        let mut out = Vec::with_capacity(chunks.len());
        let mut i = 0;
        for ch in chunks.iter() {
            let n = if ch.all_logits { ch.tokens.len() } else { usize::from(!ch.tokens.is_empty()) };
            out.push(logits[i * cfg.vocab..(i + n) * cfg.vocab].to_vec());
            i += n;
        }
        Ok(out)
    }

    /// Rotates adjacent pairs of every head (GGUF stores Q/K permuted for this layout).
    fn apply_rope(&self, x: &mut [f32], pos: usize) {
        let hd = self.cfg.head_dim;
        let half = hd / 2;
        let table = &self.rope[pos * half..(pos + 1) * half];
        for head in x.chunks_exact_mut(hd) {
            for (i, &(cos, sin)) in table.iter().enumerate() {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * cos - b * sin;
                head[2 * i + 1] = a * sin + b * cos;
            }
        }
    }
}

fn round_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ms = (xr.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / d as f64) as f32;
        let s = 1.0 / (ms + eps).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * s * g;
        }
    }
}

fn vector(m: QMatrix) -> anyhow::Result<Vec<f32>> {
    let mut out = vec![0f32; m.rows * m.cols];
    for r in 0..m.rows {
        m.dequantize_row(r, &mut out[r * m.cols..(r + 1) * m.cols]);
    }
    Ok(out)
}

/// Reads one tensor's bytes in its file format. candle reports GGUF shapes row-major: (rows, columns).
fn read_matrix(content: &Content, f: &mut std::fs::File, name: &str) -> anyhow::Result<QMatrix> {
    let info = content.tensor_infos.get(name).ok_or_else(|| anyhow!("GGUF has no tensor `{name}`"))?;
    let dims = info.shape.dims();
    let (cols, rows) = match dims {
        [c] => (*c, 1),
        [r, c] => (*c, *r),
        other => bail!("tensor `{name}` has shape {other:?}; expected 1 or 2 dimensions"),
    };
    let format = match info.ggml_dtype {
        GgmlDType::Q4_1 => Format::Q4_1,
        GgmlDType::Q8_0 => Format::Q8_0,
        GgmlDType::F32 => Format::F32,
        other => bail!("tensor `{name}` is {other:?}; the native engine reads Q4_1, Q8_0 and F32"),
    };
    if cols % super::quant::QK != 0 {
        bail!("tensor `{name}`: {cols} columns is not a multiple of 32");
    }
    let bytes = rows * (cols / super::quant::QK) * format.block_bytes();
    let mut data = vec![0u8; bytes];
    f.seek(SeekFrom::Start(content.tensor_data_offset + info.offset))?;
    f.read_exact(&mut data).with_context(|| format!("reading tensor `{name}`"))?;
    QMatrix::new(rows, cols, format, data).with_context(|| format!("tensor `{name}`"))
}

/// Index of the largest value (the lowest index among equals), as greedy decoding needs.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best as u32
}
