//! Reading generations: an item joined with its prompt and its completion.

use serde::Serialize;
use sqlx::{FromRow, QueryBuilder, Sqlite};
use utoipa::ToSchema;

use crate::db::Db;
use crate::domain::job::ItemStatus;
use crate::domain::prompt_set::Message;
use crate::domain::search::TextSearch;
use crate::error::{ApiError, ApiResult};
use crate::soft_labels::SoftLabelColumns;

#[derive(Debug, Clone, FromRow)]
pub struct GenerationRow {
    pub id: i64,
    pub job_id: i64,
    pub prompt_id: i64,
    pub status: String,
    pub attempts: i64,
    pub cache_hit: i64,
    pub last_error: Option<String>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub external_id: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<String>,
    pub system: Option<String>,
    pub metadata: Option<String>,
    pub endpoint: Option<String>,
    pub request: Option<String>,
    pub text: Option<String>,
    pub finish_reason: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub latency_ms: Option<i64>,
    pub model: Option<String>,
    pub system_fingerprint: Option<String>,
    pub http_attempts: Option<i64>,
    pub prompt_token_ids: Option<Vec<u8>>,
    pub completion_token_ids: Option<Vec<u8>>,
    /// The soft-label blob (`soft_labels::encode`); NULL without logprobs, and not selected by
    /// pages that do not show it.
    pub soft_labels: Option<Vec<u8>>,
}

impl GenerationRow {
    /// The decoded soft labels; a blob that does not decode is an error naming the generation
    /// (never shown as if the job had none).
    pub fn soft_label_columns(&self) -> ApiResult<Option<SoftLabelColumns>> {
        self.soft_labels
            .as_deref()
            .map(|b| {
                SoftLabelColumns::from_blob(b).map_err(|e| {
                    ApiError::Internal(anyhow::anyhow!("generation {}: stored soft labels do not decode: {e}", self.id))
                })
            })
            .transpose()
    }

    /// What was sent to the teacher: messages for chat, text for completions.
    pub fn request_value(&self) -> Option<serde_json::Value> {
        let req = self.request.as_deref()?;
        Some(match self.endpoint.as_deref() {
            Some("chat") => serde_json::from_str(req).unwrap_or(serde_json::Value::Null),
            _ => serde_json::Value::String(req.to_string()),
        })
    }

    pub fn request_messages(&self) -> Option<Vec<Message>> {
        match self.endpoint.as_deref() {
            Some("chat") => serde_json::from_str(self.request.as_deref()?).ok(),
            _ => None,
        }
    }

    pub fn metadata_value(&self) -> Option<serde_json::Value> {
        self.metadata.as_deref().and_then(|m| serde_json::from_str(m).ok())
    }
}

/// A generation as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct GenerationView {
    pub id: i64,
    pub job_id: i64,
    pub prompt_id: i64,
    /// The submitter's own id of the prompt.
    pub external_id: Option<String>,
    pub status: ItemStatus,
    /// Times the item was claimed.
    pub attempts: i64,
    /// Answered from the dedup cache instead of the teacher.
    pub cache_hit: bool,
    pub last_error: Option<String>,
    /// The prompt as submitted (text prompts).
    pub prompt: Option<String>,
    /// The prompt as submitted (conversation prompts).
    pub messages: Option<Vec<Message>>,
    pub system: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    /// What the teacher was sent: messages (chat) or text (completions).
    #[schema(value_type = Option<Object>)]
    pub request: Option<serde_json::Value>,
    /// The teacher's answer.
    pub text: Option<String>,
    pub finish_reason: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub latency_ms: Option<i64>,
    /// Model id the teacher reported.
    pub model: Option<String>,
    pub system_fingerprint: Option<String>,
    /// Requests sent for the answer, including retries.
    pub http_attempts: Option<i64>,
    /// Exact prompt token ids the teacher used (local teachers).
    pub prompt_token_ids: Option<Vec<u32>>,
    /// Exact answer token ids, including a final end-of-turn token (local teachers).
    pub completion_token_ids: Option<Vec<u32>>,
    /// The teacher's top-k per answer token, for jobs with `logprobs` (pages include them only
    /// when asked: `soft_labels=true`).
    pub soft_labels: Option<SoftLabelColumns>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// Token id -> text as the teacher decodes it, for every id above (`GET
    /// /v1/generations/{id}?token_texts=true`, when the teacher that answered is still
    /// configured and has a tokenizer).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub token_texts: Option<std::collections::BTreeMap<u32, String>>,
}

impl TryFrom<GenerationRow> for GenerationView {
    type Error = ApiError;

    fn try_from(r: GenerationRow) -> ApiResult<Self> {
        Ok(GenerationView {
            soft_labels: r.soft_label_columns()?,
            request: r.request_value(),
            metadata: r.metadata_value(),
            messages: r.messages.as_deref().and_then(|m| serde_json::from_str(m).ok()),
            id: r.id,
            job_id: r.job_id,
            prompt_id: r.prompt_id,
            external_id: r.external_id,
            status: ItemStatus::parse(&r.status).unwrap_or(ItemStatus::Queued),
            attempts: r.attempts,
            cache_hit: r.cache_hit != 0,
            last_error: r.last_error,
            prompt: r.prompt,
            system: r.system,
            text: r.text,
            finish_reason: r.finish_reason,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            latency_ms: r.latency_ms,
            model: r.model,
            system_fingerprint: r.system_fingerprint,
            http_attempts: r.http_attempts,
            prompt_token_ids: r.prompt_token_ids.as_deref().map(crate::queue::blob_ids),
            completion_token_ids: r.completion_token_ids.as_deref().map(crate::queue::blob_ids),
            started_at: r.started_at,
            finished_at: r.finished_at,
            token_texts: None,
        })
    }
}

const SELECT: &str = "SELECT g.id, g.job_id, g.prompt_id, g.status, g.attempts, g.cache_hit, g.last_error,
        g.started_at, g.finished_at, p.external_id, p.prompt, p.messages, p.system, p.metadata,
        c.endpoint, c.request, c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens, c.latency_ms,
        c.model, c.system_fingerprint, c.http_attempts, c.prompt_token_ids, c.completion_token_ids,
        {SOFT} AS soft_labels
   FROM generations g
   JOIN prompts p ON p.id = g.prompt_id
   LEFT JOIN completions c ON c.id = g.completion_id";

/// The select with or without the soft-label blob (pages leave it out unless asked: it is the
/// largest column by far).
fn select(soft_labels: bool) -> String {
    SELECT.replace("{SOFT}", if soft_labels { "c.soft_labels" } else { "NULL" })
}

/// Which of a job's generations a page holds.
#[derive(Debug, Clone, Default)]
pub struct PageFilter {
    /// Only items in this status.
    pub status: Option<ItemStatus>,
    /// Only items whose prompt or answer matches.
    pub search: Option<TextSearch>,
    /// Include the soft-label blob.
    pub soft_labels: bool,
}

/// A page of a job's generations with id > `after`, in id order. The job's index is walked in
/// id order and a search is a set lookup per row, so no page reads more rows than it must.
pub async fn page(db: &Db, job_id: i64, filter: &PageFilter, after: i64, limit: i64) -> ApiResult<Vec<GenerationRow>> {
    let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(select(filter.soft_labels));
    qb.push(" WHERE g.job_id = ").push_bind(job_id);
    qb.push(" AND g.id > ").push_bind(after);
    if let Some(st) = filter.status {
        qb.push(" AND g.status = ").push_bind(st.as_str());
    }
    if let Some(search) = &filter.search {
        qb.push(" AND (g.prompt_id IN (SELECT rowid FROM prompts_fts WHERE prompts_fts MATCH ")
            .push_bind(search.fts_expr())
            .push(") OR g.completion_id IN (SELECT rowid FROM completions_fts WHERE completions_fts MATCH ")
            .push_bind(search.fts_expr())
            .push("))");
    }
    qb.push(" ORDER BY g.id LIMIT ").push_bind(limit);
    Ok(qb.build_query_as().fetch_all(&db.reader).await?)
}

pub async fn get(db: &Db, id: i64) -> ApiResult<GenerationRow> {
    sqlx::query_as(&format!("{} WHERE g.id = ?", select(true)))
        .bind(id)
        .fetch_optional(&db.reader)
        .await?
        .ok_or_else(|| ApiError::not_found("generation", id))
}
