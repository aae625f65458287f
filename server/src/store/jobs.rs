//! `jobs`, their items' counts, and job state transitions.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::{FromRow, QueryBuilder, Sqlite};
use utoipa::ToSchema;

use super::INSERT_CHUNK;
use crate::db::Db;
use crate::domain::job::{ItemStatus, JobAction, JobParams, JobStatus};
use crate::error::{ApiError, ApiResult};
use crate::time::now_ms;

#[derive(Debug, Clone, FromRow)]
pub struct JobRow {
    pub id: i64,
    pub prompt_set_id: i64,
    pub teacher: String,
    pub teacher_identity: String,
    pub status: String,
    pub params: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cache_hits: i64,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

impl JobRow {
    pub fn params(&self) -> anyhow::Result<JobParams> {
        Ok(serde_json::from_str(&self.params)?)
    }

    pub fn status(&self) -> JobStatus {
        JobStatus::parse(&self.status).unwrap_or(JobStatus::Queued)
    }
}

/// Items of a job per status.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ItemCounts {
    pub queued: i64,
    pub running: i64,
    pub done: i64,
    pub failed: i64,
    pub cancelled: i64,
}

impl ItemCounts {
    pub fn total(&self) -> i64 {
        self.queued + self.running + self.done + self.failed + self.cancelled
    }

    fn add(&mut self, status: &str, n: i64) {
        match ItemStatus::parse(status) {
            Some(ItemStatus::Queued) => self.queued += n,
            Some(ItemStatus::Running) => self.running += n,
            Some(ItemStatus::Done) => self.done += n,
            Some(ItemStatus::Failed) => self.failed += n,
            Some(ItemStatus::Cancelled) => self.cancelled += n,
            None => {}
        }
    }
}

/// A job as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobView {
    pub id: i64,
    pub prompt_set: i64,
    pub teacher: String,
    pub status: JobStatus,
    pub params: JobParams,
    pub counts: ItemCounts,
    pub total: i64,
    /// Prompt tokens over done generations, as the teacher reported them.
    pub tokens_in: i64,
    /// Completion tokens over done generations.
    pub tokens_out: i64,
    /// Done generations answered from the dedup cache instead of the teacher.
    pub cache_hits: i64,
    /// Recent rate: answers finished in the last minute (whole run once done), per second.
    pub answers_per_second: f64,
    /// Completion tokens per second over the same window.
    pub tokens_per_second: f64,
    /// Seconds until the queued and running items are done at the current rate.
    pub eta_seconds: Option<f64>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

const JOB_COLUMNS: &str = "id, prompt_set_id, teacher, teacher_identity, status, params, prompt_tokens, \
     completion_tokens, cache_hits, created_at, started_at, finished_at";

/// Creates a job and one queued item per prompt, in one transaction.
pub async fn insert(
    db: &Db,
    prompt_set_id: i64,
    teacher: &str,
    teacher_identity: &str,
    params: &JobParams,
    items: &[(i64, String)],
) -> ApiResult<i64> {
    let now = now_ms();
    let mut tx = db.writer.begin().await?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO jobs (prompt_set_id, teacher, teacher_identity, status, params, created_at, updated_at)
         VALUES (?, ?, ?, 'queued', ?, ?, ?) RETURNING id",
    )
    .bind(prompt_set_id)
    .bind(teacher)
    .bind(teacher_identity)
    .bind(serde_json::to_string(params).map_err(anyhow::Error::from)?)
    .bind(now)
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    for chunk in items.chunks(INSERT_CHUNK) {
        let mut qb: QueryBuilder<Sqlite> =
            QueryBuilder::new("INSERT INTO generations (job_id, prompt_id, status, cache_key, run_at) ");
        qb.push_values(chunk, |mut b, (prompt_id, key)| {
            b.push_bind(id).push_bind(prompt_id).push_bind("queued").push_bind(key).push_bind(0i64);
        });
        qb.build().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(id)
}

pub async fn get_row(db: &Db, id: i64) -> ApiResult<JobRow> {
    sqlx::query_as(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?"))
        .bind(id)
        .fetch_optional(&db.reader)
        .await?
        .ok_or_else(|| ApiError::not_found("job", id))
}

async fn counts_for(db: &Db, job_id: Option<i64>) -> ApiResult<BTreeMap<i64, ItemCounts>> {
    let rows: Vec<(i64, String, i64)> = match job_id {
        Some(id) => {
            sqlx::query_as("SELECT job_id, status, count(*) FROM generations WHERE job_id = ? GROUP BY job_id, status")
                .bind(id)
                .fetch_all(&db.reader)
                .await?
        }
        None => {
            sqlx::query_as("SELECT job_id, status, count(*) FROM generations GROUP BY job_id, status")
                .fetch_all(&db.reader)
                .await?
        }
    };
    let mut out: BTreeMap<i64, ItemCounts> = BTreeMap::new();
    for (job, status, n) in rows {
        out.entry(job).or_default().add(&status, n);
    }
    Ok(out)
}

const RATE_WINDOW_MS: i64 = 60_000;

async fn view(db: &Db, row: JobRow, counts: ItemCounts) -> ApiResult<JobView> {
    let now = now_ms();
    let status = row.status();
    let (answers_per_second, tokens_per_second) = match (row.started_at, row.finished_at) {
        (Some(start), Some(end)) if end > start => {
            let secs = (end - start) as f64 / 1000.0;
            (counts.done as f64 / secs, row.completion_tokens as f64 / secs)
        }
        (Some(start), None) => {
            let since = now - RATE_WINDOW_MS;
            let (answers, tokens): (i64, i64) = sqlx::query_as(
                "SELECT count(*), coalesce(sum(c.completion_tokens), 0)
                   FROM generations g JOIN completions c ON c.id = g.completion_id
                  WHERE g.job_id = ? AND g.status = 'done' AND g.finished_at > ?",
            )
            .bind(row.id)
            .bind(since)
            .fetch_one(&db.reader)
            .await?;
            let secs = (now - start.max(since)).max(1) as f64 / 1000.0;
            (answers as f64 / secs, tokens as f64 / secs)
        }
        _ => (0.0, 0.0),
    };
    let remaining = counts.queued + counts.running;
    let eta_seconds = match status {
        JobStatus::Done | JobStatus::Cancelled => Some(0.0),
        _ if remaining == 0 => Some(0.0),
        _ if answers_per_second > 0.0 => Some(remaining as f64 / answers_per_second),
        _ => None,
    };
    Ok(JobView {
        id: row.id,
        prompt_set: row.prompt_set_id,
        status,
        params: row.params()?,
        total: counts.total(),
        counts,
        tokens_in: row.prompt_tokens,
        tokens_out: row.completion_tokens,
        cache_hits: row.cache_hits,
        answers_per_second,
        tokens_per_second,
        eta_seconds,
        created_at: row.created_at,
        started_at: row.started_at,
        finished_at: row.finished_at,
        teacher: row.teacher,
    })
}

pub async fn get(db: &Db, id: i64) -> ApiResult<JobView> {
    let row = get_row(db, id).await?;
    let counts = counts_for(db, Some(id)).await?.remove(&id).unwrap_or_default();
    view(db, row, counts).await
}

pub async fn list(db: &Db) -> ApiResult<Vec<JobView>> {
    let rows: Vec<JobRow> = sqlx::query_as(&format!("SELECT {JOB_COLUMNS} FROM jobs ORDER BY id"))
        .fetch_all(&db.reader)
        .await?;
    let mut counts = counts_for(db, None).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let c = counts.remove(&row.id).unwrap_or_default();
        out.push(view(db, row, c).await?);
    }
    Ok(out)
}

/// Applies a pause/resume/cancel/retry-failed action.
pub async fn apply(db: &Db, id: i64, action: JobAction) -> ApiResult<()> {
    let now = now_ms();
    let mut tx = db.writer.begin().await?;
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = ?")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    let status = status.ok_or_else(|| ApiError::not_found("job", id))?;
    let status = JobStatus::parse(&status).unwrap_or(JobStatus::Queued);
    action.check(status).map_err(ApiError::conflict)?;
    match action {
        JobAction::Pause => {
            sqlx::query("UPDATE jobs SET status = 'paused', updated_at = ? WHERE id = ?")
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        JobAction::Resume => {
            sqlx::query(
                "UPDATE jobs SET status = CASE WHEN started_at IS NULL THEN 'queued' ELSE 'running' END,
                 updated_at = ? WHERE id = ?",
            )
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        JobAction::Cancel => {
            // Running items are cancelled too: their late answers still fill the dedup cache
            // but are not attached to this job (the fenced write finds the item cancelled).
            sqlx::query(
                "UPDATE generations SET status = 'cancelled', lease_owner = NULL, lease_expires_at = NULL,
                 finished_at = ? WHERE job_id = ? AND status IN ('queued', 'running')",
            )
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE jobs SET status = 'cancelled', finished_at = ?, updated_at = ? WHERE id = ?")
                .bind(now)
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        JobAction::RetryFailed => {
            let n = sqlx::query(
                "UPDATE generations SET status = 'queued', attempts = 0, run_at = 0, last_error = NULL,
                 finished_at = NULL WHERE job_id = ? AND status = 'failed'",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n > 0 && status == JobStatus::Done {
                sqlx::query("UPDATE jobs SET status = 'running', finished_at = NULL, updated_at = ? WHERE id = ?")
                    .bind(now)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Marks jobs done once no item is queued or running.
pub async fn finish_completed(db: &Db) -> anyhow::Result<u64> {
    let now = now_ms();
    Ok(sqlx::query(
        "UPDATE jobs SET status = 'done', finished_at = ?, updated_at = ?
         WHERE status IN ('queued', 'running')
           AND NOT EXISTS (SELECT 1 FROM generations g WHERE g.job_id = jobs.id AND g.status IN ('queued', 'running'))",
    )
    .bind(now)
    .bind(now)
    .execute(&db.writer)
    .await?
    .rows_affected())
}
