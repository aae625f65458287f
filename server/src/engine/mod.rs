//! The native engine: batched greedy decoding of Llama-family GGUF models on the CPU, with our
//! own quantized matrix products (see `quant`). It exists because mistralrs 0.8.1 decodes this
//! file far slower than llama.cpp on a CPU; mistralrs stays for the architectures not covered.

pub mod attention;
pub mod llama;
pub mod logprobs;
#[cfg(feature = "mistralrs")]
pub mod mistral;
pub mod quant;
pub mod scheduler;

/// `general.architecture` values mistralrs 0.8.1 runs from GGUF (its `pipeline/gguf.rs`); it
/// panics on most others, so they are refused before it sees them.
pub const MISTRALRS_ARCHITECTURES: &[&str] =
    &["llama", "mistral3", "phi2", "phi3", "starcoder2", "qwen2", "qwen3", "qwen3moe"];

pub fn check_mistralrs_architecture(arch: &str) -> anyhow::Result<()> {
    if !MISTRALRS_ARCHITECTURES.contains(&arch) {
        anyhow::bail!(
            "architecture `{arch}` is supported neither by the native engine (llama) nor by mistralrs 0.8.1 ({})",
            MISTRALRS_ARCHITECTURES.join(", ")
        );
    }
    Ok(())
}
