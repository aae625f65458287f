//! The teacher abstraction: a small trait, so the queue and HTTP layer never know which backend
//! answers. Backends: `openai` (any OpenAI-compatible server) and `local` (in-process).

pub mod local;
pub mod openai;
pub mod retry;
pub mod server_logprobs;
pub mod token_map;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::config::{TeacherSettings, TeacherSpec};
use crate::domain::job::JobParams;
use crate::domain::render::RenderedRequest;
use crate::soft_labels::Position;

/// One greedy generation request. Decoding is always temperature 0, top_p 1, one answer.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub request: RenderedRequest,
    pub max_new_tokens: u32,
    pub stop: Vec<String>,
    pub seed: i64,
    /// Soft labels: top-k pairs to record at every answer position (0: none).
    pub top_k: u32,
    /// Teacher forcing: score this answer instead of generating one (rescore jobs).
    pub answer: Option<String>,
}

/// What the teacher answered, with the metadata recorded per generation.
#[derive(Debug, Clone, Default)]
pub struct GenerateOutput {
    pub text: String,
    pub finish_reason: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    /// Model id the teacher reported.
    pub model: Option<String>,
    pub system_fingerprint: Option<String>,
    /// Wall time of the successful request.
    pub latency: Duration,
    /// Requests sent, including retries.
    pub http_attempts: u32,
    /// Exact prompt token ids, when the teacher tokenized it itself (local teachers).
    pub prompt_token_ids: Option<Vec<u32>>,
    /// Exact answer token ids (including a final end-of-turn token), when known.
    pub completion_token_ids: Option<Vec<u32>>,
    /// One per answer token id when the request asked for `top_k` > 0 (natural log).
    pub soft_labels: Option<Vec<Position>>,
}

/// Why a generation did not come back.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TeacherError {
    /// Worth trying again later (rate limits, outages, timeouts) after retries ran out.
    #[error("{message} (after {attempts} attempts)")]
    Transient { message: String, attempts: u32 },
    /// The teacher refused the request; retrying will not help.
    #[error("{message}")]
    Fatal { message: String, attempts: u32 },
}

/// A model that answers prompts.
#[async_trait]
pub trait Teacher: Send + Sync {
    /// The name the teacher was configured under.
    fn name(&self) -> &str;
    /// Stable identity (backend, address, model) for the dedup cache; no secrets.
    fn identity(&self) -> &str;
    /// Requests the queue may have in flight at once.
    fn max_in_flight(&self) -> usize;
    /// Greedily answers one request.
    async fn generate(&self, req: &GenerateRequest) -> Result<GenerateOutput, TeacherError>;
    /// Whether the teacher answers at all.
    async fn health(&self) -> Result<(), String>;
    /// Whether the teacher can record the job's `logprobs` soft-label pairs per answer token
    /// in its `mode`; the reason if not. Asked once when a job is submitted (an
    /// OpenAI-compatible teacher probes its server), so a job it cannot serve is refused
    /// instead of failing item by item.
    async fn supports(&self, params: &JobParams) -> Result<(), String> {
        let _ = params;
        Err(format!("teacher `{}` cannot record soft labels", self.name()))
    }
    /// The text of each token id as the teacher's tokenizer decodes it alone (a piece of a
    /// multi-byte character shows as U+FFFD); `None` when the teacher has no tokenizer.
    fn token_texts(&self, ids: &[u32]) -> Option<Vec<String>> {
        let _ = ids;
        None
    }
    /// Why the teacher cannot work at all (e.g. its model failed to load); jobs are refused.
    fn load_error(&self) -> Option<String> {
        None
    }
}

/// Builds the backend a configured teacher names.
pub async fn build(settings: &TeacherSettings) -> anyhow::Result<Arc<dyn Teacher>> {
    match &settings.spec {
        TeacherSpec::OpenAi { .. } => Ok(Arc::new(openai::OpenAiTeacher::new(settings)?)),
        TeacherSpec::Local { path } => Ok(Arc::new(local::LocalTeacher::load(settings, path).await)),
    }
}
