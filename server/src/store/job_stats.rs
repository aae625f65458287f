//! Aggregates over one job's items for the job page: answers over time (from `job_seconds`, one
//! row per second with answers) and failures by reason (from the `generations_by_job_status`
//! index), so both stay fast on jobs of any size.

use serde::Serialize;
use utoipa::ToSchema;

use crate::db::Db;
use crate::error::ApiResult;
use crate::store::jobs::JobRow;
use crate::time::now_ms;

/// Most buckets a throughput request may ask for.
pub const MAX_BUCKETS: i64 = 500;
/// Most failure reasons listed.
const MAX_REASONS: i64 = 50;

/// Answers finished in one time bucket.
#[derive(Debug, Serialize, ToSchema)]
pub struct Bucket {
    /// Bucket start, unix milliseconds.
    pub start: i64,
    pub answers: i64,
    /// Completion tokens of those answers.
    pub tokens: i64,
}

/// A job's done answers over time, from its start to its end (or now).
#[derive(Debug, Serialize, ToSchema)]
pub struct Throughput {
    /// Width of each bucket in milliseconds (at least one second).
    pub bucket_ms: i64,
    /// Every bucket from the job's start, empty ones included; none before the job starts.
    pub buckets: Vec<Bucket>,
}

pub async fn throughput(db: &Db, job: &JobRow, buckets: i64) -> ApiResult<Throughput> {
    let Some(start) = job.started_at else {
        return Ok(Throughput { bucket_ms: 1000, buckets: Vec::new() });
    };
    let end = job.finished_at.unwrap_or_else(now_ms).max(start + 1);
    let bucket_ms = ((end - start + buckets - 1) / buckets).max(1000);
    let n = ((end - start + bucket_ms - 1) / bucket_ms).max(1);
    // One row per second with answers (`job_seconds`, kept by a trigger), not one per answer.
    let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT (second * 1000 - ?1) / ?2 AS b, sum(answers), sum(tokens)
           FROM job_seconds WHERE job_id = ?3 AND second >= ?1 / 1000
          GROUP BY b ORDER BY b",
    )
    .bind(start)
    .bind(bucket_ms)
    .bind(job.id)
    .fetch_all(&db.reader)
    .await?;
    let mut out: Vec<Bucket> = (0..n).map(|i| Bucket { start: start + i * bucket_ms, answers: 0, tokens: 0 }).collect();
    for (b, answers, tokens) in rows {
        // An answer recorded after the job's end (a late retry) lands in the last bucket.
        let i = (b.max(0) as usize).min(out.len() - 1);
        out[i].answers += answers;
        out[i].tokens += tokens;
    }
    Ok(Throughput { bucket_ms, buckets: out })
}

/// Failed items that share a last error.
#[derive(Debug, Serialize, ToSchema)]
pub struct FailureReason {
    pub reason: String,
    pub count: i64,
    /// One generation with this reason (the lowest id).
    pub example: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Failures {
    /// Failed items in the job.
    pub total: i64,
    /// Most frequent first, at most 50.
    pub reasons: Vec<FailureReason>,
}

pub async fn failures(db: &Db, job_id: i64) -> ApiResult<Failures> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT coalesce(last_error, '(no reason recorded)') AS reason, count(*) AS n, min(id)
           FROM generations WHERE job_id = ? AND status = 'failed'
          GROUP BY reason ORDER BY n DESC, reason LIMIT ?",
    )
    .bind(job_id)
    .bind(MAX_REASONS)
    .fetch_all(&db.reader)
    .await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM generations WHERE job_id = ? AND status = 'failed'")
        .bind(job_id)
        .fetch_one(&db.reader)
        .await?;
    let reasons = rows.into_iter().map(|(reason, count, example)| FailureReason { reason, count, example }).collect();
    Ok(Failures { total, reasons })
}
