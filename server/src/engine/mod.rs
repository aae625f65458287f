//! The native engine: batched greedy decoding of Llama-family GGUF models on the CPU, with our
//! own quantized matrix products (see `quant`). It exists because mistralrs 0.8.1 decodes this
//! file far slower than llama.cpp on a CPU; mistralrs stays for the architectures not covered.

pub mod attention;
pub mod llama;
pub mod quant;
pub mod scheduler;
