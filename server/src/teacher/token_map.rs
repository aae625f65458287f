//! Token ids for what OpenAI-compatible servers return with logprobs. vLLM gives ids when asked
//! (`return_tokens_as_token_ids`: tokens come back as `token_id:N`); other servers (llama.cpp,
//! mistral.rs) give each token's text. Texts are mapped back through the teacher's tokenizer:
//! an id is used only when exactly one vocabulary entry decodes to that text, so every stored
//! id is one we can vouch for.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;

use crate::model::gguf::GgufMetadata;
use crate::model::tokenizer::ModelTokenizer;

pub struct TokenMap {
    tokenizer: tokenizers::Tokenizer,
    /// Decoded text of a token → the ids that decode to it (more than one: ambiguous).
    by_text: HashMap<String, Vec<u32>>,
}

/// Why a token text could not be given an id.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Unmapped {
    #[error("no token of the teacher's vocabulary decodes to {0:?}")]
    Unknown(String),
    #[error("{1} tokens of the teacher's vocabulary decode to {0:?}")]
    Ambiguous(String, usize),
    #[error("{0:?} is not a token id the server may return (vocabulary of {1})")]
    BadId(String, usize),
}

impl TokenMap {
    /// Loads the teacher's tokenizer: a GGUF file, a `tokenizer.json`, or a folder holding one.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let tokenizer = if path.is_dir() {
            let file = path.join("tokenizer.json");
            tokenizers::Tokenizer::from_file(&file)
                .map_err(|e| anyhow::anyhow!("{} is not a readable tokenizer: {e}", file.display()))?
        } else if path.extension().is_some_and(|e| e == "gguf") {
            let meta = GgufMetadata::read(path)?;
            ModelTokenizer::from_metadata(&meta).with_context(|| format!("tokenizer of {}", path.display()))?.tokenizer
        } else {
            tokenizers::Tokenizer::from_file(path)
                .map_err(|e| anyhow::anyhow!("{} is not a readable tokenizer: {e}", path.display()))?
        };
        Ok(Self::new(tokenizer))
    }

    pub fn new(tokenizer: tokenizers::Tokenizer) -> Self {
        let mut by_text: HashMap<String, Vec<u32>> = HashMap::new();
        for id in 0..tokenizer.get_vocab_size(true) as u32 {
            if let Ok(text) = tokenizer.decode(&[id], false) {
                // A token that is part of a UTF-8 sequence has no text of its own.
                if !text.is_empty() && !text.contains('\u{FFFD}') {
                    by_text.entry(text).or_default().push(id);
                }
            }
        }
        TokenMap { tokenizer, by_text }
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The id of a returned token: `token_id:N` as vLLM writes it, else the one vocabulary
    /// entry that decodes to the text.
    pub fn id(&self, token: &str) -> Result<u32, Unmapped> {
        if let Some(n) = token.strip_prefix("token_id:") {
            return match n.parse::<u32>() {
                Ok(id) if (id as usize) < self.vocab_size() => Ok(id),
                _ => Err(Unmapped::BadId(token.to_string(), self.vocab_size())),
            };
        }
        match self.by_text.get(token).map(Vec::as_slice) {
            Some([id]) => Ok(*id),
            Some(ids) => Err(Unmapped::Ambiguous(token.to_string(), ids.len())),
            None => Err(Unmapped::Unknown(token.to_string())),
        }
    }

    /// The text of a sequence of ids (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, false).unwrap_or_default()
    }
}

/// `token_id:N` parsed without a tokenizer (servers that return ids need none).
pub fn parse_token_id(token: &str) -> Option<u32> {
    token.strip_prefix("token_id:")?.parse().ok()
}
