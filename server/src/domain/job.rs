//! Jobs: the submission, its validated parameters, and the states jobs and items move through.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::render::JobTemplate;
use super::Invalid;

pub const MAX_NEW_TOKENS_LIMIT: u32 = 1 << 20;
pub const DEFAULT_MAX_NEW_TOKENS: u32 = 1024;
const MAX_STOPS: usize = 16;
/// Most soft-label pairs per position a job may ask for.
pub const MAX_LOGPROBS: u32 = 100;

/// Which OpenAI-compatible endpoint the teacher is called on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    /// `/v1/chat/completions`: the teacher's chat template is applied by the teacher.
    #[default]
    Chat,
    /// `/v1/completions`: the rendered template is sent as raw text.
    Completions,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Completions => "completions",
        }
    }
}

/// What a job asks of the teacher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum JobMode {
    /// Decode an answer greedily (the default).
    #[default]
    Generate,
    /// Score given answers by teacher forcing, without decoding: every prompt is a conversation
    /// ending with an assistant turn, and the teacher's top-k is recorded at each of its tokens.
    Rescore,
}

impl JobMode {
    fn is_generate(&self) -> bool {
        *self == JobMode::Generate
    }
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// JSON body of `POST /v1/jobs`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// Id of the prompt set to answer.
    pub prompt_set: i64,
    /// Name of a teacher configured with `--teacher NAME=SPEC`.
    pub teacher: String,
    /// Token limit of each answer (default 1024).
    pub max_new_tokens: Option<i64>,
    /// minijinja template applied to each prompt's text, e.g.
    /// `Please reason step by step: {{ prompt }}`. Variables: `prompt`, `id`, `metadata`.
    pub template: Option<String>,
    /// System prompt for prompts that have none of their own.
    pub system: Option<String>,
    /// Stop strings (at most 16).
    pub stop: Option<Vec<String>>,
    /// Seed sent to the teacher (default 0). Decoding is greedy regardless.
    pub seed: Option<i64>,
    /// `chat` (default) or `completions`.
    pub endpoint: Option<Endpoint>,
    /// Soft labels: record the teacher's top-k (token id, natural-log probability) pairs at
    /// every answer token, k = 1..=100 (0 or absent: none). The answer is still greedy.
    pub logprobs: Option<i64>,
    /// `generate` (default) or `rescore` (teacher-force the prompts' final assistant turns).
    pub mode: Option<JobMode>,
}

/// Validated job parameters, stored as JSON in `jobs.params`. Part of the dedup cache key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobParams {
    pub endpoint: Endpoint,
    pub max_new_tokens: u32,
    pub template: Option<String>,
    pub system: Option<String>,
    pub stop: Vec<String>,
    pub seed: i64,
    /// Soft-label pairs per answer position (0: none). Absent in jobs stored before version 3.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub logprobs: u32,
    #[serde(default, skip_serializing_if = "JobMode::is_generate")]
    pub mode: JobMode,
}

impl JobRequest {
    /// Checks every field except the references (prompt set, teacher), which need the store.
    pub fn params(&self) -> Result<JobParams, Invalid> {
        let max_new_tokens = match self.max_new_tokens {
            None => DEFAULT_MAX_NEW_TOKENS,
            Some(n) if n >= 1 && n <= MAX_NEW_TOKENS_LIMIT as i64 => n as u32,
            Some(n) => {
                return Err(Invalid::new(
                    "max_new_tokens",
                    format!("max_new_tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}, got {n}"),
                ))
            }
        };
        let stop = self.stop.clone().unwrap_or_default();
        if stop.len() > MAX_STOPS {
            return Err(Invalid::new("stop", format!("at most {MAX_STOPS} stop strings")));
        }
        for (i, s) in stop.iter().enumerate() {
            if s.is_empty() || s.len() > 256 {
                return Err(Invalid::new(format!("stop[{i}]"), "stop strings must be 1 to 256 bytes"));
            }
        }
        let seed = self.seed.unwrap_or(0);
        if seed < 0 {
            return Err(Invalid::new("seed", "seed must not be negative"));
        }
        let endpoint = self.endpoint.unwrap_or_default();
        if let Some(t) = &self.template {
            JobTemplate::compile(t)?;
        }
        if endpoint == Endpoint::Completions && self.system.is_some() {
            return Err(Invalid::new(
                "system",
                "the completions endpoint takes raw text; put the system text in `template` instead",
            ));
        }
        let logprobs = match self.logprobs {
            None => 0,
            Some(k) if (0..=MAX_LOGPROBS as i64).contains(&k) => k as u32,
            Some(k) => {
                return Err(Invalid::new("logprobs", format!("logprobs must be between 0 and {MAX_LOGPROBS}, got {k}")))
            }
        };
        let mode = self.mode.unwrap_or_default();
        if mode == JobMode::Rescore {
            if logprobs == 0 {
                return Err(Invalid::new("logprobs", "a rescore job records soft labels: set logprobs to 1..=100"));
            }
            if endpoint != Endpoint::Chat {
                return Err(Invalid::new("endpoint", "a rescore job scores conversations: use the chat endpoint"));
            }
            if !stop.is_empty() {
                return Err(Invalid::new("stop", "a rescore job does not decode, so stop strings do not apply"));
            }
        }
        if self.teacher.is_empty() {
            return Err(Invalid::new("teacher", "teacher must name a configured teacher"));
        }
        Ok(JobParams {
            endpoint,
            max_new_tokens,
            template: self.template.clone(),
            system: self.system.clone(),
            stop,
            seed,
            logprobs,
            mode,
        })
    }
}

/// Job life cycle: queued → running → done, with paused and cancelled on the side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Paused,
    Done,
    Cancelled,
}

impl JobStatus {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "paused" => JobStatus::Paused,
            "done" => JobStatus::Done,
            "cancelled" => JobStatus::Cancelled,
            _ => return None,
        })
    }

    pub fn is_active(self) -> bool {
        matches!(self, JobStatus::Queued | JobStatus::Running | JobStatus::Paused)
    }
}

/// State of one (job, prompt) item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ItemStatus {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl ItemStatus {
    pub const ALL: [ItemStatus; 5] =
        [ItemStatus::Queued, ItemStatus::Running, ItemStatus::Done, ItemStatus::Failed, ItemStatus::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            ItemStatus::Queued => "queued",
            ItemStatus::Running => "running",
            ItemStatus::Done => "done",
            ItemStatus::Failed => "failed",
            ItemStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        ItemStatus::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// Actions on a job, and the states they are allowed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobAction {
    Pause,
    Resume,
    Cancel,
    RetryFailed,
}

impl JobAction {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pause" => JobAction::Pause,
            "resume" => JobAction::Resume,
            "cancel" => JobAction::Cancel,
            "retry-failed" => JobAction::RetryFailed,
            _ => return None,
        })
    }

    /// Whether the action makes sense in `status`; the reason if not.
    pub fn check(self, status: JobStatus) -> Result<(), String> {
        let ok = match self {
            JobAction::Pause => matches!(status, JobStatus::Queued | JobStatus::Running),
            JobAction::Resume => status == JobStatus::Paused,
            JobAction::Cancel => status.is_active(),
            JobAction::RetryFailed => status != JobStatus::Cancelled,
        };
        if ok {
            Ok(())
        } else {
            Err(format!("cannot {self:?} a job that is {status:?}").to_lowercase())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(json: &str) -> Result<JobParams, Invalid> {
        serde_json::from_str::<JobRequest>(json).unwrap().params()
    }

    #[test]
    fn rejects_absurd_parameters() {
        assert_eq!(job(r#"{"prompt_set":1,"teacher":"t","max_new_tokens":0}"#).unwrap_err().field, "max_new_tokens");
        assert_eq!(job(r#"{"prompt_set":1,"teacher":"t","max_new_tokens":-5}"#).unwrap_err().field, "max_new_tokens");
        assert_eq!(job(r#"{"prompt_set":1,"teacher":"t","seed":-1}"#).unwrap_err().field, "seed");
        assert_eq!(job(r#"{"prompt_set":1,"teacher":"t","stop":[""]}"#).unwrap_err().field, "stop[0]");
        assert_eq!(job(r#"{"prompt_set":1,"teacher":"t","template":"{{ prompt"}"#).unwrap_err().field, "template");
        assert_eq!(job(r#"{"prompt_set":1,"teacher":"t","template":"no variable"}"#).unwrap_err().field, "template");
        assert_eq!(job(r#"{"prompt_set":1,"teacher":"t","logprobs":101}"#).unwrap_err().field, "logprobs");
        assert_eq!(job(r#"{"prompt_set":1,"teacher":"t","logprobs":-1}"#).unwrap_err().field, "logprobs");
        assert_eq!(job(r#"{"prompt_set":1,"teacher":"t","mode":"rescore"}"#).unwrap_err().field, "logprobs");
        assert_eq!(job(r#"{"prompt_set":1,"teacher":"t","mode":"rescore","logprobs":5,"stop":["x"]}"#).unwrap_err().field, "stop");
        assert!(serde_json::from_str::<JobRequest>(r#"{"prompt_set":1,"teacher":"t","mode":"score"}"#).is_err());
        let p = job(r#"{"prompt_set":1,"teacher":"t"}"#).unwrap();
        assert_eq!((p.max_new_tokens, p.seed, p.endpoint, p.logprobs, p.mode), (1024, 0, Endpoint::Chat, 0, JobMode::Generate));
        // Parameters stored before soft labels existed still read, and plain jobs store as before.
        let old: JobParams =
            serde_json::from_str(r#"{"endpoint":"chat","max_new_tokens":8,"template":null,"system":null,"stop":[],"seed":0}"#).unwrap();
        assert_eq!(old.logprobs, 0);
        assert!(!serde_json::to_string(&old).unwrap().contains("logprobs"));
        assert_eq!(job(r#"{"prompt_set":1,"teacher":"t","logprobs":20,"mode":"rescore"}"#).unwrap().logprobs, 20);
    }

    #[test]
    fn actions_follow_the_state_machine() {
        assert!(JobAction::Pause.check(JobStatus::Running).is_ok());
        assert!(JobAction::Pause.check(JobStatus::Done).is_err());
        assert!(JobAction::Resume.check(JobStatus::Running).is_err());
        assert!(JobAction::Cancel.check(JobStatus::Cancelled).is_err());
        assert!(JobAction::RetryFailed.check(JobStatus::Done).is_ok());
    }
}
