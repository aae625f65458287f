//! Local model files: GGUF metadata and the tokenizer rebuilt from it. Shared by the local
//! teacher, the trainer and the soft-label mode, which must all agree on token ids.

pub mod chat_template;
pub mod gguf;
pub mod hf;
pub mod tokenizer;
