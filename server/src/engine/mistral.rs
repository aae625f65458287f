//! mistralrs 0.8.1 for the GGUF architectures the native engine does not cover (qwen2, phi3, ...).
//!
//! mistralrs is used for its forward pass only: prompts go in as our own token ids (its GGUF
//! tokenizer ignores the pre-tokenizer), and a per-request logits processor reads the raw logits,
//! takes the argmax itself and records every chosen id (mistralrs reports no ids, and its
//! logprobs are base 10). Loading runs in a spawned task so that a panic in mistralrs (it panics
//! on architectures it does not know) becomes a load error. Requests run one at a time (see
//! `load`). Findings: `docs/notes/mistralrs.md`.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, Context};
use candle_core::Tensor;
use mistralrs::core::RequestMessage;
use mistralrs::{
    Constraint, CustomLogitsProcessor, GgufModelBuilder, Model, NormalRequest, Request, Response, SamplingParams,
    StopTokens, TokenSource,
};

use super::llama::argmax;
use super::logprobs::top_k as soft_label;
use super::scheduler::Generated;
use crate::soft_labels::Position;

pub struct MistralEngine {
    model: Model,
}

/// What the logits processor saw of one request.
#[derive(Default)]
struct Trace {
    /// The argmax at every step: the answer's ids.
    ids: Vec<u32>,
    /// A stop string appeared; the step after it was forced to the stop id.
    stopped_by_string: bool,
    /// Soft labels, one per id, when asked for.
    soft: Vec<Position>,
}

impl MistralEngine {
    /// Loads a GGUF file with mistralrs, offline (`TokenSource::None`, a local folder), on the CPU.
    pub async fn load(path: &Path, arch: &str) -> anyhow::Result<Self> {
        super::check_mistralrs_architecture(arch)?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        // mistralrs takes the hub path unless the folder exists; make it absolute so no lookup is relative.
        let dir = dir.canonicalize().with_context(|| format!("cannot resolve {}", dir.display()))?;
        let file = path.file_name().context("model path has no file name")?.to_string_lossy().to_string();
        let builder = GgufModelBuilder::new(dir.to_string_lossy(), vec![file])
            .with_token_source(TokenSource::None)
            .with_force_cpu()
            // One sequence at a time: batching prompts of different lengths on the CPU changes
            // mistralrs 0.8.1's greedy answers (33-37 of 54 tokens matched llama.cpp with 4 in a
            // batch, 54 of 54 one at a time; tests/tests/mistralrs_engine.rs).
            .with_max_num_seqs(1)
            .with_prefix_cache_n(None);
        match tokio::spawn(async move { builder.build().await }).await {
            Ok(Ok(model)) => Ok(MistralEngine { model }),
            Ok(Err(e)) => Err(anyhow!("mistralrs could not load the model: {e:#}")),
            Err(e) if e.is_panic() => {
                let why = e
                    .into_panic()
                    .downcast::<String>()
                    .map(|s| *s)
                    .or_else(|p| p.downcast::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|_| "no message".into());
                Err(anyhow!("mistralrs panicked while loading the model: {why}"))
            }
            Err(e) => Err(anyhow!("mistralrs loader task failed: {e}")),
        }
    }

    /// Greedy decoding of `prompt` (token ids), stopping at a stop id, a stop string
    /// (`stop_check` on the ids so far) or `max_new_tokens`; with `top_k` > 0 the soft labels of
    /// every step, from the raw logits the processor sees (mistralrs's own are base 10, and −∞
    /// for the alternatives in greedy mode).
    pub async fn generate(
        &self,
        prompt: Vec<u32>,
        max_new_tokens: usize,
        stop_ids: Vec<u32>,
        stop_check: Option<Box<dyn Fn(&[u32]) -> bool + Send>>,
        top_k: usize,
    ) -> Result<Generated, String> {
        let started = Instant::now();
        let trace = Arc::new(Mutex::new(Trace::default()));
        let force_to = *stop_ids.first().ok_or("no stop token id")?;
        let stop_check = Mutex::new(stop_check);
        let seen = Arc::clone(&trace);
        let processor = move |logits: &Tensor, _context: &[u32]| -> candle_core::Result<Tensor> {
            let values: Vec<f32> = logits.to_vec1()?;
            let mut t = seen.lock().expect("trace lock");
            let check = stop_check.lock().expect("stop check lock");
            if let Some(check) = check.as_ref() {
                if !t.ids.is_empty() && !t.stopped_by_string && check(&t.ids) {
                    t.stopped_by_string = true;
                    let mut forced = vec![f32::NEG_INFINITY; values.len()];
                    forced[force_to as usize] = 0.0;
                    return Tensor::from_vec(forced, values.len(), logits.device());
                }
            }
            let id = argmax(&values);
            if top_k > 0 {
                t.soft.push(soft_label(&values, top_k, id));
            }
            t.ids.push(id);
            Ok(logits.clone())
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let sampling = SamplingParams {
            // Some(0.0), not None: None means temperature 1 in mistralrs.
            temperature: Some(0.0),
            top_k: None,
            top_p: None,
            min_p: None,
            top_n_logprobs: 0,
            frequency_penalty: None,
            presence_penalty: None,
            repetition_penalty: None,
            stop_toks: Some(StopTokens::Ids(stop_ids.clone())),
            // One more step than asked, for the forced stop after a stop string.
            max_len: Some(max_new_tokens + 1),
            logits_bias: None,
            n_choices: 1,
            dry_params: None,
        };
        let request = Request::Normal(Box::new(NormalRequest {
            messages: RequestMessage::CompletionTokens(prompt),
            sampling_params: sampling,
            response: tx,
            return_logprobs: false,
            is_streaming: false,
            id: 0,
            constraint: Constraint::None,
            suffix: None,
            tools: None,
            tool_choice: None,
            logits_processors: Some(vec![Arc::new(processor) as Arc<dyn CustomLogitsProcessor>]),
            return_raw_logits: false,
            web_search_options: None,
            model_id: None,
            truncate_sequence: false,
        }));
        let sender = self.model.inner().get_sender(None).map_err(|e| format!("mistralrs engine unavailable: {e}"))?;
        sender.send(request).await.map_err(|e| format!("mistralrs engine unavailable: {e}"))?;
        loop {
            match rx.recv().await {
                Some(Response::CompletionDone(_)) => break,
                Some(Response::CompletionChunk(_)) => continue,
                Some(Response::InternalError(e)) | Some(Response::ValidationError(e)) => {
                    return Err(format!("mistralrs: {e}"))
                }
                Some(Response::CompletionModelError(msg, _)) => return Err(format!("mistralrs: {msg}")),
                Some(_) => return Err("mistralrs sent an unexpected response".into()),
                None => return Err("the mistralrs engine stopped (it may have panicked)".into()),
            }
        }
        let trace = std::mem::take(&mut *trace.lock().map_err(|_| "trace lock poisoned")?);
        let (mut ids, mut soft) = (trace.ids, trace.soft);
        let finish = if trace.stopped_by_string {
            "stop"
        } else if ids.len() > max_new_tokens {
            ids.truncate(max_new_tokens);
            soft.truncate(max_new_tokens);
            "length"
        } else if ids.last().is_some_and(|l| stop_ids.contains(l)) {
            "stop"
        } else {
            "length"
        };
        Ok(Generated { ids, finish, elapsed: started.elapsed(), soft_labels: soft })
    }
}
