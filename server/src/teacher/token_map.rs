//! Token ids for what OpenAI-compatible servers return with logprobs. vLLM gives ids when asked
//! (`return_tokens_as_token_ids`: tokens come back as `token_id:N`); other servers (llama.cpp,
//! mistral.rs) give each token's text. Texts are mapped back through the teacher's tokenizer:
//! an id is used only when exactly one vocabulary entry decodes to that text, so every stored
//! id is one we can vouch for.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;

use crate::domain::prompt_set::Message;
use crate::model::chat_template::ChatTemplate;
use crate::model::gguf::GgufMetadata;
use crate::model::tokenizer::ModelTokenizer;

pub struct TokenMap {
    tokenizer: tokenizers::Tokenizer,
    /// Decoded text of a token → the ids that decode to it (more than one: ambiguous).
    by_text: HashMap<String, Vec<u32>>,
    /// From a GGUF: the model's tokenizer and chat template, to render conversations for
    /// re-scoring on the server.
    model: Option<(ModelTokenizer, ChatTemplate)>,
}

/// A conversation rendered for re-scoring: the text sent, and its ids split at the answer.
pub struct RenderedAnswer {
    pub text: String,
    pub prompt_ids: Vec<u32>,
    /// The answer's ids and the end-of-turn token that closes it.
    pub answer_ids: Vec<u32>,
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
            let tok = ModelTokenizer::from_metadata(&meta).with_context(|| format!("tokenizer of {}", path.display()))?;
            let mut map = Self::new(tok.tokenizer.clone());
            if let Some(source) = meta.opt_string("tokenizer.chat_template") {
                let t = |id| tok.token_text(id);
                let template = ChatTemplate::new(source, &t(tok.special.bos), &t(Some(tok.special.eos)))?;
                map.model = Some((tok, template));
            }
            return Ok(map);
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
        TokenMap { tokenizer, by_text, model: None }
    }

    /// The BOS id of the model (GGUF maps only).
    pub fn bos(&self) -> Option<u32> {
        self.model.as_ref().and_then(|(t, _)| t.special.bos)
    }

    /// Whether conversations can be rendered (the map came from a GGUF with a chat template).
    pub fn can_render(&self) -> bool {
        self.model.is_some()
    }

    /// The text and ids of `messages` followed by the assistant turn `answer`, as the model's
    /// chat template renders them; None without a GGUF's tokenizer and template.
    pub fn render_answer(&self, messages: &[Message], answer: &str) -> Option<anyhow::Result<RenderedAnswer>> {
        let (tok, template) = self.model.as_ref()?;
        Some((|| {
            let prompt = template.render(messages)?;
            let mut prompt_ids = Vec::new();
            if tok.special.add_bos {
                prompt_ids.extend(tok.special.bos);
            }
            prompt_ids.extend(tok.encode(&prompt, true)?);
            let mut answer_ids = tok.encode(answer, false)?;
            answer_ids.push(tok.special.eos);
            let text = format!("{prompt}{answer}{}", tok.token_text(Some(tok.special.eos)));
            Ok(RenderedAnswer { text, prompt_ids, answer_ids })
        })())
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

    /// The text of one token id alone.
    pub fn text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    /// Whether `id` is a special token (it has no text when special tokens are skipped; servers
    /// such as llama.cpp return "" for them).
    pub fn is_special(&self, id: u32) -> bool {
        self.tokenizer.decode(&[id], true).is_ok_and(|t| t.is_empty())
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
