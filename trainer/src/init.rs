//! Where the student starts (`--init`): a GGUF file (dequantized to f32), an HF folder, or
//! `scratch:CONFIG.json` (random weights); with the tokenizer and chat template that go with it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use server::model::gguf::GgufMetadata;
use server::model::hf::{read_gguf_as_hf, HfFolder, HfLlamaConfig, NamedTensor};
use server::model::tokenizer::ModelTokenizer;

/// The parsed `--init` value.
#[derive(Debug, Clone, PartialEq)]
pub enum InitSpec {
    Gguf(PathBuf),
    Folder(PathBuf),
    Scratch(PathBuf),
}

impl std::str::FromStr for InitSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        if let Some(cfg) = s.strip_prefix("scratch:") {
            return Ok(InitSpec::Scratch(PathBuf::from(cfg)));
        }
        let p = PathBuf::from(s);
        if p.is_dir() {
            Ok(InitSpec::Folder(p))
        } else if p.is_file() {
            Ok(InitSpec::Gguf(p))
        } else {
            bail!("--init {s}: no such file or folder; give a GGUF file, an HF folder (config.json + *.safetensors + tokenizer.json) or scratch:CONFIG.json")
        }
    }
}

/// A tokenizer with the chat template that goes with it.
pub struct TokenizerAndTemplate {
    pub tokenizer: ModelTokenizer,
    pub template: Option<String>,
}

/// Reads a tokenizer from a GGUF file or an HF folder.
pub fn tokenizer_from(path: &Path) -> anyhow::Result<TokenizerAndTemplate> {
    if path.is_dir() {
        let folder = HfFolder::open(path)?;
        Ok(TokenizerAndTemplate { tokenizer: folder.tokenizer()?, template: folder.chat_template()? })
    } else {
        let meta = GgufMetadata::read(path)?;
        Ok(TokenizerAndTemplate {
            tokenizer: ModelTokenizer::from_metadata(&meta)?,
            template: meta.opt_string("tokenizer.chat_template").map(str::to_string),
        })
    }
}

/// The student's starting point.
pub struct Init {
    pub config: HfLlamaConfig,
    /// None: random weights (scratch).
    pub tensors: Option<Vec<NamedTensor>>,
    pub tokenizer: TokenizerAndTemplate,
}

/// Loads `--init`; `tokenizer` (`--tokenizer`) overrides where the tokenizer comes from and is
/// required for scratch configs without a tokenizer.json beside them.
pub fn load(spec: &InitSpec, tokenizer: Option<&Path>) -> anyhow::Result<Init> {
    let (config, tensors, own_tok) = match spec {
        InitSpec::Gguf(p) => {
            let (cfg, t) = read_gguf_as_hf(p).with_context(|| format!("--init {}", p.display()))?;
            (cfg, Some(t), Some(p.clone()))
        }
        InitSpec::Folder(dir) => {
            let folder = HfFolder::open(dir).with_context(|| format!("--init {}", dir.display()))?;
            let st = folder.tensors()?;
            let mut names: Vec<String> = st.names().into_keys().collect();
            names.sort();
            let mut tensors = Vec::new();
            for name in names {
                let (values, shape) = st.f32(&name)?;
                tensors.push(NamedTensor { name, shape, values });
            }
            (folder.config, Some(tensors), Some(dir.clone()))
        }
        InitSpec::Scratch(cfg) => {
            let text = std::fs::read_to_string(cfg)
                .with_context(|| format!("--init scratch:{}: cannot read the config", cfg.display()))?;
            let config: HfLlamaConfig = serde_json::from_str(&text)
                .with_context(|| format!("--init scratch:{}: not a Llama config.json", cfg.display()))?;
            config.check().with_context(|| format!("--init scratch:{}", cfg.display()))?;
            let beside = cfg.parent().map(Path::to_path_buf).filter(|d| d.join("tokenizer.json").is_file());
            (config, None, beside)
        }
    };
    let tok_path = tokenizer.map(Path::to_path_buf).or(own_tok).context(
        "a scratch model needs a tokenizer: pass --tokenizer GGUF_OR_HF_FOLDER (e.g. the teacher's GGUF)",
    )?;
    let tokenizer = tokenizer_from(&tok_path).with_context(|| format!("tokenizer from {}", tok_path.display()))?;
    if tokenizer.tokenizer.vocab_size > config.vocab_size {
        bail!(
            "the init model's vocabulary ({}) does not match the tokenizer's ({} tokens, from {}); \
             use the tokenizer the model was trained with",
            config.vocab_size,
            tokenizer.tokenizer.vocab_size,
            tok_path.display()
        );
    }
    Ok(Init { config, tensors, tokenizer })
}
