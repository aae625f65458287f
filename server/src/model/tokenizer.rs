//! The model's tokenizer and its special tokens: from an HF folder's `tokenizer.json`, or a
//! Hugging Face `tokenizers::Tokenizer` rebuilt from GGUF metadata with the pre-tokenizer the
//! GGUF's `tokenizer.ggml.pre` names (mistralrs 0.8.1 ignores it and splits digits, chat tokens
//! and whitespace differently from the model's real tokenizer). Verified against llama.cpp on
//! the same file by `tests/tests/tokenizer.rs`.


use anyhow::{bail, Context};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::gguf::GgufMetadata;

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// The GPT-2 split, as in the `ByteLevel` pre-tokenizer with `use_regex`.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Special token ids a chat model needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: u32,
    /// Tokens that end a turn (EOS, `<|im_end|>`, `<|eot_id|>`, ...).
    pub stop: Vec<u32>,
    pub add_bos: bool,
}

/// A tokenizer and its special tokens, from one GGUF file or HF folder.
pub struct ModelTokenizer {
    pub tokenizer: Tokenizer,
    /// The same tokenizer with control tokens treated as plain text.
    plain: Tokenizer,
    pub special: SpecialTokens,
    pub vocab_size: usize,
}

/// EOS plus the end-of-generation tokens llama.cpp recognises by name (llama-vocab.cpp), when
/// the vocabulary has them as control tokens, so both engines stop alike.
fn stop_ids(eos: u32, control: impl Fn(&str) -> Option<u32>) -> Vec<u32> {
    let mut stop = vec![eos];
    for name in [
        "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>", "<end_of_turn>",
        "<EOT>", "_<EOT>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<fim-repo>", "<reponame>",
    ] {
        if let Some(i) = control(name) {
            if !stop.contains(&i) {
                stop.push(i);
            }
        }
    }
    stop
}

fn pre_tokenizer(pre: &str) -> anyhow::Result<PreTokenizerWrapper> {
    let split = |re: &str| -> anyhow::Result<PreTokenizerWrapper> {
        Ok(PreTokenizerWrapper::Split(
            Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| anyhow::anyhow!("bad split regex: {e}"))?,
        ))
    };
    let byte_level_only = || PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false));
    Ok(match pre {
        // GPT-2's regex, digits split one by one (SmolLM / SmolLM2).
        "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ])),
        "gpt2" | "default" | "gpt-2" => PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" => {
            PreTokenizerWrapper::Sequence(Sequence::new(vec![split(LLAMA3_SPLIT)?, byte_level_only()]))
        }
        "qwen2" | "deepseek-r1-qwen" => {
            PreTokenizerWrapper::Sequence(Sequence::new(vec![split(QWEN2_SPLIT)?, byte_level_only()]))
        }
        other => bail!(
            "GGUF pre-tokenizer `{other}` is not supported yet (supported: smollm, gpt2, llama3/llama-bpe, qwen2); \
             give an HF folder with tokenizer.json instead"
        ),
    })
}

impl ModelTokenizer {
    /// Rebuilds the tokenizer of a byte-level BPE GGUF (`tokenizer.ggml.model = gpt2`).
    pub fn from_metadata(meta: &GgufMetadata) -> anyhow::Result<Self> {
        let model = meta.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            bail!(
                "{}: tokenizer model `{model}` is not supported yet (only byte-level BPE, `gpt2`)",
                meta.path.display()
            );
        }
        let pre = meta.opt_string("tokenizer.ggml.pre").unwrap_or("default");
        let tokens = meta.strings("tokenizer.ggml.tokens")?;
        let merges = meta.strings("tokenizer.ggml.merges")?;
        let types = meta.i32s("tokenizer.ggml.token_type").unwrap_or_else(|_| vec![1; tokens.len()]);
        let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .map(|m| {
                let (a, b) = m.split_once(' ').with_context(|| format!("bad merge `{m}`"))?;
                Ok((a.to_string(), b.to_string()))
            })
            .collect::<anyhow::Result<_>>()?;
        let ignore_merges = matches!(pre, "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe");
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build BPE: {e}"))?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
        tokenizer.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));
        // Control tokens are special (split out only when special tokens are parsed);
        // user-defined ones are always split out, as llama.cpp does.
        let mut control = Vec::new();
        let mut user = Vec::new();
        for (t, ty) in tokens.iter().zip(&types) {
            match *ty {
                TOKEN_TYPE_CONTROL => control.push(AddedToken::from(t.clone(), true)),
                TOKEN_TYPE_USER_DEFINED => user.push(AddedToken::from(t.clone(), false)),
                _ => {}
            }
        }
        tokenizer.add_special_tokens(&control);
        tokenizer.add_tokens(&user);

        let eos = meta.opt_u32("tokenizer.ggml.eos_token_id").context("GGUF has no tokenizer.ggml.eos_token_id")?;
        let bos = meta.opt_u32("tokenizer.ggml.bos_token_id");
        let control = |name: &str| {
            tokens.iter().position(|t| t == name).filter(|&i| types.get(i) == Some(&TOKEN_TYPE_CONTROL)).map(|i| i as u32)
        };
        let mut stop = stop_ids(eos, control);
        if let Some(eot) = meta.opt_u32("tokenizer.ggml.eot_token_id") {
            if !stop.contains(&eot) {
                stop.push(eot);
            }
        }
        let add_bos = meta.opt_bool("tokenizer.ggml.add_bos_token").unwrap_or(false);
        Ok(Self::with_special(tokenizer, tokens.len(), SpecialTokens { bos, eos, stop, add_bos }))
    }

    /// A tokenizer from `tokenizer.json` with the special tokens an HF folder declares
    /// (`tokenizer_config.json`, `generation_config.json`).
    pub fn from_hf(tokenizer: Tokenizer, vocab_size: usize, bos: Option<u32>, eos: u32, extra_stop: &[u32], add_bos: bool) -> Self {
        let specials: std::collections::HashMap<String, u32> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (t.content, id))
            .collect();
        let mut stop = stop_ids(eos, |name| specials.get(name).copied());
        for id in extra_stop {
            if !stop.contains(id) {
                stop.push(*id);
            }
        }
        Self::with_special(tokenizer, vocab_size, SpecialTokens { bos, eos, stop, add_bos })
    }

    fn with_special(tokenizer: Tokenizer, vocab_size: usize, special: SpecialTokens) -> Self {
        let mut plain = tokenizer.clone();
        plain.set_encode_special_tokens(true);
        ModelTokenizer { vocab_size, tokenizer, plain, special }
    }

    /// The text of a token id (for templates' `bos_token`/`eos_token`).
    pub fn token_text(&self, id: Option<u32>) -> String {
        id.and_then(|i| self.tokenizer.id_to_token(i)).unwrap_or_default()
    }

    /// Token ids of `text`. With `parse_special`, control tokens written in the text (e.g.
    /// `<|im_start|>` in a rendered chat prompt) become their ids; without, they are plain text.
    pub fn encode(&self, text: &str, parse_special: bool) -> anyhow::Result<Vec<u32>> {
        let t = if parse_special { &self.tokenizer } else { &self.plain };
        let enc = t.encode_fast(text, false);
        Ok(enc.map_err(|e| anyhow::anyhow!("tokenize: {e}"))?.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> anyhow::Result<String> {
        self.tokenizer.decode(ids, skip_special).map_err(|e| anyhow::anyhow!("detokenize: {e}"))
    }
}
