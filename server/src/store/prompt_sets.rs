//! `prompt_sets` and `prompts`.

use serde::Serialize;
use sqlx::{FromRow, QueryBuilder, Sqlite};
use utoipa::ToSchema;

use super::INSERT_CHUNK;
use crate::db::Db;
use crate::domain::prompt_set::{Message, NewPromptSet, PromptContent};
use crate::domain::render;
use crate::error::{ApiError, ApiResult};
use crate::time::now_ms;

/// A prompt set as listed.
#[derive(Debug, Serialize, FromRow, ToSchema)]
pub struct PromptSetSummary {
    pub id: i64,
    pub name: String,
    /// `json`, `jsonl`, `csv` or `parquet`.
    pub source: String,
    pub count: i64,
    /// Unix milliseconds.
    pub created_at: i64,
}

/// A prompt set with the jobs that use it.
#[derive(Debug, Serialize, ToSchema)]
pub struct PromptSetDetail {
    #[serde(flatten)]
    pub summary: PromptSetSummary,
    pub job_ids: Vec<i64>,
}

/// A stored prompt as the store reads it.
#[derive(Debug, Clone, FromRow)]
pub struct PromptRow {
    pub id: i64,
    pub position: i64,
    pub external_id: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<String>,
    pub system: Option<String>,
    pub metadata: Option<String>,
}

impl PromptRow {
    pub fn content(&self) -> anyhow::Result<PromptContent> {
        Ok(match (&self.prompt, &self.messages) {
            (Some(p), _) => PromptContent::Text(p.clone()),
            (None, Some(m)) => PromptContent::Messages(serde_json::from_str::<Vec<Message>>(m)?),
            (None, None) => anyhow::bail!("prompt {} has no content", self.id),
        })
    }

    /// Runs `f` on the prompt as templates see it (content parsed, metadata as JSON): the one
    /// way a stored prompt is rendered, for submission, preview and the worker alike.
    pub fn with_view<T>(&self, f: impl FnOnce(&render::PromptView<'_>) -> T) -> anyhow::Result<T> {
        let content = self.content()?;
        let metadata = self.metadata_value();
        Ok(f(&render::PromptView {
            content: &content,
            system: self.system.as_deref(),
            external_id: self.external_id.as_deref(),
            metadata: &metadata,
        }))
    }

    pub fn metadata_value(&self) -> serde_json::Value {
        self.metadata
            .as_deref()
            .and_then(|m| serde_json::from_str(m).ok())
            .unwrap_or(serde_json::Value::Null)
    }
}

/// A stored prompt as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct PromptView {
    pub id: i64,
    pub position: i64,
    /// The submitter's own id.
    pub external_id: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<Message>>,
    pub system: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
}

impl From<PromptRow> for PromptView {
    fn from(r: PromptRow) -> Self {
        let metadata = r.metadata.as_deref().and_then(|m| serde_json::from_str(m).ok());
        PromptView {
            id: r.id,
            position: r.position,
            external_id: r.external_id,
            messages: r.messages.as_deref().and_then(|m| serde_json::from_str(m).ok()),
            prompt: r.prompt,
            system: r.system,
            metadata,
        }
    }
}

/// Inserts a validated set in one transaction. Returns (id, count).
pub async fn insert(db: &Db, set: NewPromptSet) -> ApiResult<(i64, i64)> {
    let mut tx = db.writer.begin().await?;
    let count = set.prompts.len() as i64;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO prompt_sets (name, source, prompt_count, created_at) VALUES (?, ?, ?, ?) RETURNING id",
    )
    .bind(&set.name)
    .bind(set.source.as_str())
    .bind(count)
    .bind(now_ms())
    .fetch_one(&mut *tx)
    .await?;
    for (chunk_no, chunk) in set.prompts.chunks(INSERT_CHUNK).enumerate() {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO prompts (prompt_set_id, position, external_id, prompt, messages, system, metadata) ",
        );
        qb.push_values(chunk.iter().enumerate(), |mut b, (i, p)| {
            let (text, messages) = match &p.content {
                PromptContent::Text(t) => (Some(t.clone()), None),
                PromptContent::Messages(m) => (None, Some(serde_json::to_string(m).expect("serializable"))),
            };
            b.push_bind(id)
                .push_bind((chunk_no * INSERT_CHUNK + i) as i64)
                .push_bind(p.external_id.clone())
                .push_bind(text)
                .push_bind(messages)
                .push_bind(p.system.clone())
                .push_bind(p.metadata.as_ref().map(|m| serde_json::to_string(m).expect("serializable")));
        });
        qb.build().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok((id, count))
}

const SUMMARY_COLUMNS: &str = "id, name, source, prompt_count AS count, created_at";

pub async fn list(db: &Db) -> ApiResult<Vec<PromptSetSummary>> {
    Ok(sqlx::query_as(&format!("SELECT {SUMMARY_COLUMNS} FROM prompt_sets ORDER BY id"))
        .fetch_all(&db.reader)
        .await?)
}

pub async fn get(db: &Db, id: i64) -> ApiResult<PromptSetDetail> {
    let summary: PromptSetSummary =
        sqlx::query_as(&format!("SELECT {SUMMARY_COLUMNS} FROM prompt_sets WHERE id = ?"))
            .bind(id)
            .fetch_optional(&db.reader)
            .await?
            .ok_or_else(|| ApiError::not_found("prompt set", id))?;
    let job_ids = sqlx::query_scalar("SELECT id FROM jobs WHERE prompt_set_id = ? ORDER BY id")
        .bind(id)
        .fetch_all(&db.reader)
        .await?;
    Ok(PromptSetDetail { summary, job_ids })
}

/// Prompts of a set in order, after `after_position`.
pub async fn prompts(db: &Db, set_id: i64, after_position: i64, limit: i64) -> ApiResult<Vec<PromptRow>> {
    Ok(sqlx::query_as(
        "SELECT id, position, external_id, prompt, messages, system, metadata FROM prompts
         WHERE prompt_set_id = ? AND position > ? ORDER BY position LIMIT ?",
    )
    .bind(set_id)
    .bind(after_position)
    .bind(limit)
    .fetch_all(&db.reader)
    .await?)
}

pub async fn prompt(db: &Db, prompt_id: i64) -> ApiResult<PromptRow> {
    sqlx::query_as("SELECT id, position, external_id, prompt, messages, system, metadata FROM prompts WHERE id = ?")
        .bind(prompt_id)
        .fetch_optional(&db.reader)
        .await?
        .ok_or_else(|| ApiError::not_found("prompt", prompt_id))
}

/// Deletes a set. Refused while an active job uses it; finished jobs that use it are deleted
/// with it only when `with_jobs` is set, so stored answers are never dropped by surprise.
pub async fn delete(db: &Db, id: i64, with_jobs: bool) -> ApiResult<()> {
    let mut tx = db.writer.begin().await?;
    let exists: Option<i64> = sqlx::query_scalar("SELECT id FROM prompt_sets WHERE id = ?")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    if exists.is_none() {
        return Err(ApiError::not_found("prompt set", id));
    }
    let jobs: Vec<(i64, String)> = sqlx::query_as("SELECT id, status FROM jobs WHERE prompt_set_id = ? ORDER BY id")
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
    let active: Vec<i64> = jobs
        .iter()
        .filter(|(_, s)| matches!(s.as_str(), "queued" | "running" | "paused"))
        .map(|(id, _)| *id)
        .collect();
    if !active.is_empty() {
        return Err(ApiError::conflict(format!(
            "prompt set {id} is used by active job(s) {active:?}; cancel them first"
        )));
    }
    if !jobs.is_empty() && !with_jobs {
        let ids: Vec<i64> = jobs.iter().map(|(id, _)| *id).collect();
        return Err(ApiError::conflict(format!(
            "prompt set {id} is used by finished job(s) {ids:?} whose generations would be deleted too; \
             repeat with ?with_jobs=true to delete them"
        )));
    }
    sqlx::query("DELETE FROM jobs WHERE prompt_set_id = ?").bind(id).execute(&mut *tx).await?;
    sqlx::query("DELETE FROM prompt_sets WHERE id = ?").bind(id).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}
