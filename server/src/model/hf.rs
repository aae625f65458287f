//! Hugging Face model folders (`config.json`, `*.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json`, `generation_config.json`): reading them as a teacher, and the
//! mapping between GGUF and HF tensor names and layouts for Llama-family checkpoints. The
//! trainer writes such folders; the server loads them back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::Value;

use super::tokenizer::ModelTokenizer;

/// The `config.json` fields of a Llama-family checkpoint (SmolLM2, Llama, Mistral-style).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
pub struct HfLlamaConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f32,
    #[serde(default = "default_context")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub bos_token_id: Option<Value>,
    #[serde(default)]
    pub eos_token_id: Option<Value>,
}

fn default_rope_theta() -> f32 {
    10_000.0
}
fn default_eps() -> f32 {
    1e-5
}
fn default_context() -> usize {
    2048
}

impl HfLlamaConfig {
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let cfg: HfLlamaConfig = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a Llama-family config (hidden_size, num_hidden_layers, ...)", path.display()))?;
        cfg.check().with_context(|| format!("{}", path.display()))?;
        Ok(cfg)
    }

    /// Refuses what the Llama code paths would silently get wrong.
    pub fn check(&self) -> anyhow::Result<()> {
        let llama_like = ["llama", "mistral", "smollm", ""];
        if !llama_like.contains(&self.model_type.as_str()) {
            bail!("model_type `{}` is not Llama-family (supported: llama, mistral)", self.model_type);
        }
        if let Some(a) = self.architectures.iter().find(|a| !matches!(a.as_str(), "LlamaForCausalLM" | "MistralForCausalLM")) {
            bail!("architecture `{a}` is not supported (LlamaForCausalLM, MistralForCausalLM)");
        }
        if self.hidden_act.as_deref().is_some_and(|a| a != "silu") {
            bail!("hidden_act `{}` is not supported (silu)", self.hidden_act.as_deref().unwrap_or_default());
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            bail!("rope_scaling is not supported yet");
        }
        if self.attention_bias || self.mlp_bias {
            bail!("attention_bias / mlp_bias are not supported");
        }
        let kv = self.kv_heads();
        if self.num_attention_heads == 0 || kv == 0 || self.num_attention_heads % kv != 0 {
            bail!("num_attention_heads {} must be a multiple of num_key_value_heads {kv}", self.num_attention_heads);
        }
        if self.head_dim() * self.num_attention_heads != self.hidden_size {
            bail!("head_dim × num_attention_heads must equal hidden_size");
        }
        Ok(())
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }
}

/// The HF name of a GGUF Llama tensor (`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`).
pub fn hf_tensor_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let part = match tail.strip_suffix(".weight")? {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{part}.weight"))
}

/// Row order of Q and K projections. HF rotates halves of each head (`rotate_half`), GGUF
/// rotates adjacent pairs, so llama.cpp's converter permutes the rows of each head:
/// HF row `s·(d/2) + j` of a head becomes GGUF row `2j + s`.
fn permute_rows(w: &[f32], cols: usize, heads: usize, to_gguf: bool) -> Vec<f32> {
    let rows = w.len() / cols;
    let d = rows / heads;
    let half = d / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for s in 0..2 {
            for j in 0..half {
                let hf = h * d + s * half + j;
                let gg = h * d + 2 * j + s;
                let (src, dst) = if to_gguf { (hf, gg) } else { (gg, hf) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// HF Q/K rows → GGUF order. `heads` is the head count of that projection (KV heads for K).
pub fn qk_hf_to_gguf(w: &[f32], cols: usize, heads: usize) -> Vec<f32> {
    permute_rows(w, cols, heads, true)
}

/// GGUF Q/K rows → HF order.
pub fn qk_gguf_to_hf(w: &[f32], cols: usize, heads: usize) -> Vec<f32> {
    permute_rows(w, cols, heads, false)
}

/// A model folder, checked to hold what a teacher needs.
pub struct HfFolder {
    pub dir: PathBuf,
    pub config: HfLlamaConfig,
    pub safetensors: Vec<PathBuf>,
}

impl HfFolder {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        for need in ["config.json", "tokenizer.json"] {
            if !dir.join(need).is_file() {
                bail!("{} has no {need}; an HF model folder needs config.json, *.safetensors and tokenizer.json", dir.display());
            }
        }
        let mut safetensors: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        safetensors.sort();
        if safetensors.is_empty() {
            bail!("{} has no *.safetensors weights", dir.display());
        }
        Ok(HfFolder { dir: dir.to_path_buf(), config: HfLlamaConfig::read(dir)?, safetensors })
    }

    fn json(&self, name: &str) -> anyhow::Result<Option<Value>> {
        let path = self.dir.join(name);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        Ok(Some(serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?))
    }

    /// The tokenizer, with BOS/EOS from `tokenizer_config.json` and extra stop ids from
    /// `generation_config.json`.
    pub fn tokenizer(&self) -> anyhow::Result<ModelTokenizer> {
        let path = self.dir.join("tokenizer.json");
        let tok = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow::anyhow!("{} is not a readable tokenizer: {e}", path.display()))?;
        let cfg = self.json("tokenizer_config.json")?.unwrap_or(Value::Null);
        let token = |key: &str| -> Option<String> {
            match cfg.get(key)? {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        let id_of = |t: Option<String>| t.and_then(|t| tok.token_to_id(&t));
        let gen = self.json("generation_config.json")?.unwrap_or(Value::Null);
        let ids = |v: Option<&Value>| -> Vec<u32> {
            match v {
                Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
                Some(Value::Array(a)) => a.iter().filter_map(|n| n.as_u64()).map(|n| n as u32).collect(),
                _ => Vec::new(),
            }
        };
        let mut extra = ids(gen.get("eos_token_id"));
        extra.extend(ids(self.config.eos_token_id.as_ref()));
        let eos = id_of(token("eos_token")).or_else(|| extra.first().copied()).with_context(|| {
            format!("{}: no eos_token in tokenizer_config.json nor eos_token_id in generation_config.json", self.dir.display())
        })?;
        let bos = id_of(token("bos_token")).or_else(|| ids(self.config.bos_token_id.as_ref()).first().copied());
        let add_bos = cfg.get("add_bos_token").and_then(Value::as_bool).unwrap_or(false);
        let vocab = tok.get_vocab_size(true);
        Ok(ModelTokenizer::from_hf(tok, vocab, bos, eos, &extra, add_bos))
    }

    /// The chat template: `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`
    /// (a string, or a list of named templates of which `default` is used).
    pub fn chat_template(&self) -> anyhow::Result<Option<String>> {
        let file = self.dir.join("chat_template.jinja");
        if file.is_file() {
            return Ok(Some(std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?));
        }
        let Some(cfg) = self.json("tokenizer_config.json")? else { return Ok(None) };
        Ok(match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        })
    }

    /// Total bytes of the weight files.
    pub fn weight_bytes(&self) -> u64 {
        self.safetensors.iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum()
    }

    /// Every tensor as f32, by HF name (mapped from the weight files, converted one at a time).
    pub fn tensors(&self) -> anyhow::Result<HfTensors> {
        // SAFETY: the files are memory-mapped read-only; they must not change while loading.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&self.safetensors) }
            .map_err(|e| anyhow::anyhow!("{}: cannot read safetensors: {e}", self.dir.display()))?;
        Ok(HfTensors { st })
    }
}

pub struct HfTensors {
    st: candle_core::safetensors::MmapedSafetensors,
}

impl HfTensors {
    pub fn has(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }

    /// A tensor as f32 values and its shape.
    pub fn f32(&self, name: &str) -> anyhow::Result<(Vec<f32>, Vec<usize>)> {
        let t = self.st.load(name, &candle_core::Device::Cpu).with_context(|| format!("weights have no tensor `{name}`"))?;
        let shape = t.dims().to_vec();
        let v = t
            .to_dtype(candle_core::DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .with_context(|| format!("tensor `{name}`"))?;
        Ok((v, shape))
    }

    pub fn names(&self) -> HashMap<String, Vec<usize>> {
        self.st.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec())).collect()
    }
}

/// The HF config of a Llama-architecture GGUF, from its metadata and tensor shapes.
pub fn config_from_gguf(content: &candle_core::quantized::gguf_file::Content) -> anyhow::Result<HfLlamaConfig> {
    let md = &content.metadata;
    let arch = md.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    if arch != "llama" {
        bail!("GGUF architecture `{arch}` is not `llama`");
    }
    let u = |k: &str| -> anyhow::Result<usize> {
        md.get(&format!("llama.{k}"))
            .with_context(|| format!("GGUF metadata has no `llama.{k}`"))?
            .to_u32()
            .map(|v| v as usize)
            .map_err(|e| anyhow::anyhow!("`llama.{k}`: {e}"))
    };
    let f = |k: &str| md.get(&format!("llama.{k}")).and_then(|v| v.to_f32().ok());
    let embd = content.tensor_infos.get("token_embd.weight").context("GGUF has no token_embd.weight")?;
    let heads = u("attention.head_count")?;
    let hidden = u("embedding_length")?;
    let id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok()).map(|v| Value::from(v as u64));
    let cfg = HfLlamaConfig {
        architectures: vec!["LlamaForCausalLM".into()],
        model_type: "llama".into(),
        hidden_size: hidden,
        intermediate_size: u("feed_forward_length")?,
        num_hidden_layers: u("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: Some(u("attention.head_count_kv").unwrap_or(heads)),
        head_dim: Some(u("rope.dimension_count").unwrap_or(hidden / heads.max(1))),
        vocab_size: embd.shape.dims()[0],
        rope_theta: f("rope.freq_base").unwrap_or(10_000.0),
        rms_norm_eps: f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        max_position_embeddings: u("context_length").unwrap_or(2048),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        hidden_act: Some("silu".into()),
        rope_scaling: None,
        attention_bias: false,
        mlp_bias: false,
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        eos_token_id: id("tokenizer.ggml.eos_token_id"),
    };
    cfg.check()?;
    Ok(cfg)
}

/// One tensor in HF naming and layout.
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Every tensor of a Llama GGUF, dequantized to f32, under its HF name and in HF layout.
pub fn read_gguf_as_hf(path: &Path) -> anyhow::Result<(HfLlamaConfig, Vec<NamedTensor>)> {
    use candle_core::quantized::gguf_file::Content;
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let content = Content::read(&mut f).map_err(|e| anyhow::anyhow!("{} is not a readable GGUF: {e}", path.display()))?;
    let cfg = config_from_gguf(&content).with_context(|| format!("{}", path.display()))?;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for gguf in names {
        let Some(name) = hf_tensor_name(gguf) else {
            if gguf == "rope_freqs.weight" {
                bail!("{}: rope_freqs (Llama 3 rope scaling) is not supported yet", path.display());
            }
            continue;
        };
        let t = content
            .tensor(&mut f, gguf, &candle_core::Device::Cpu)
            .and_then(|q| q.dequantize(&candle_core::Device::Cpu))
            .map_err(|e| anyhow::anyhow!("{}: tensor `{gguf}`: {e}", path.display()))?;
        let shape = t.dims().to_vec();
        let mut values = t.flatten_all().and_then(|t| t.to_vec1::<f32>())?;
        if gguf.ends_with("attn_q.weight") {
            values = qk_gguf_to_hf(&values, shape[1], cfg.num_attention_heads);
        } else if gguf.ends_with("attn_k.weight") {
            values = qk_gguf_to_hf(&values, shape[1], cfg.kv_heads());
        }
        out.push(NamedTensor { name, shape, values });
    }
    Ok((cfg, out))
}

/// Writes an HF model folder: `model.safetensors` (f32), `config.json`, `tokenizer.json`,
/// `tokenizer_config.json` (with the chat template), `generation_config.json`. Files are
/// written under temporary names and renamed, so a crash leaves no half-written folder file.
pub fn write_folder(
    dir: &Path,
    cfg: &HfLlamaConfig,
    tensors: &[NamedTensor],
    tokenizer: &ModelTokenizer,
    chat_template: Option<&str>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: &str, bytes: &[u8]| -> anyhow::Result<()> {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join(name)).with_context(|| format!("cannot write {}", dir.join(name).display()))
    };
    let mut map = HashMap::new();
    for t in tensors {
        let tensor = candle_core::Tensor::from_slice(&t.values, t.shape.as_slice(), &candle_core::Device::Cpu)?;
        map.insert(t.name.clone(), tensor);
    }
    let tmp = dir.join(".model.safetensors.tmp");
    candle_core::safetensors::save(&map, &tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join("model.safetensors"))?;
    write("config.json", &serde_json::to_vec_pretty(cfg)?)?;
    let tok_json = tokenizer.tokenizer.to_string(true).map_err(|e| anyhow::anyhow!("cannot serialise the tokenizer: {e}"))?;
    write("tokenizer.json", tok_json.as_bytes())?;
    let sp = &tokenizer.special;
    let mut tc = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": tokenizer.token_text(Some(sp.eos)),
        "add_bos_token": sp.add_bos,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": cfg.max_position_embeddings,
    });
    if sp.bos.is_some() {
        tc["bos_token"] = Value::from(tokenizer.token_text(sp.bos));
    }
    if let Some(t) = chat_template {
        tc["chat_template"] = Value::from(t);
    }
    write("tokenizer_config.json", &serde_json::to_vec_pretty(&tc)?)?;
    let mut gen = serde_json::json!({ "eos_token_id": sp.stop, "do_sample": false });
    if let Some(b) = sp.bos {
        gen["bos_token_id"] = Value::from(b);
    }
    write("generation_config.json", &serde_json::to_vec_pretty(&gen)?)?;
    Ok(())
}
