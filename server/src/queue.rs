//! The durable queue over `generations`: claim, heartbeat, complete, fail, recover.
//!
//! A claim is one `UPDATE … RETURNING` that sets status, lease owner and expiry and bumps
//! `attempts`. Every later write on the item is fenced by (lease owner, attempts): a worker whose
//! lease expired and was taken over cannot overwrite the new owner's result. No transaction is
//! ever held open across a teacher call.

use std::time::Duration;

use sqlx::FromRow;

use crate::db::Db;
use crate::domain::job::Endpoint;
use crate::teacher::GenerateOutput;
use crate::time::now_ms;

/// An item this process holds a lease on.
#[derive(Debug, Clone, FromRow)]
pub struct Claimed {
    pub id: i64,
    pub job_id: i64,
    pub prompt_id: i64,
    pub attempts: i64,
    pub cache_key: String,
}

/// Claims up to `n` claimable items of active jobs that use `teacher`, oldest job first.
pub async fn claim(db: &Db, teacher: &str, owner: &str, n: usize, lease: Duration) -> anyhow::Result<Vec<Claimed>> {
    let now = now_ms();
    let mut tx = db.writer.begin().await?;
    let claimed: Vec<Claimed> = sqlx::query_as(
        "UPDATE generations
            SET status = 'running', attempts = attempts + 1, lease_owner = ?1, lease_expires_at = ?2,
                started_at = coalesce(started_at, ?3)
          WHERE id IN (
                SELECT g.id FROM jobs j
                  JOIN generations g ON g.job_id = j.id AND g.status = 'queued'
                 WHERE j.teacher = ?4 AND j.status IN ('queued', 'running') AND g.run_at <= ?3
                 ORDER BY j.id, g.id
                 LIMIT ?5)
      RETURNING id, job_id, prompt_id, attempts, cache_key",
    )
    .bind(owner)
    .bind(now + lease.as_millis() as i64)
    .bind(now)
    .bind(teacher)
    .bind(n as i64)
    .fetch_all(&mut *tx)
    .await?;
    let mut jobs: Vec<i64> = claimed.iter().map(|c| c.job_id).collect();
    jobs.sort_unstable();
    jobs.dedup();
    for job in jobs {
        sqlx::query(
            "UPDATE jobs SET status = 'running', started_at = coalesce(started_at, ?), updated_at = ?
             WHERE id = ? AND status = 'queued'",
        )
        .bind(now)
        .bind(now)
        .bind(job)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(claimed)
}

/// A completion already in the dedup cache.
#[derive(Debug, Clone, FromRow)]
pub struct CachedCompletion {
    pub id: i64,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
}

pub async fn cached(db: &Db, cache_key: &str) -> anyhow::Result<Option<CachedCompletion>> {
    Ok(sqlx::query_as("SELECT id, prompt_tokens, completion_tokens FROM completions WHERE cache_key = ?")
        .bind(cache_key)
        .fetch_optional(&db.reader)
        .await?)
}

/// A fresh teacher answer to record.
pub struct NewCompletion<'a> {
    pub teacher_identity: &'a str,
    pub endpoint: Endpoint,
    pub request: String,
    pub output: &'a GenerateOutput,
}

/// Where a finished item's completion comes from.
pub enum Outcome<'a> {
    Fresh(NewCompletion<'a>),
    CacheHit(CachedCompletion),
}

/// Records a finished item. The completion is stored (and so cached) even if the fence fails,
/// e.g. because the job was cancelled meanwhile. Returns whether the item was ours to finish.
pub async fn complete(db: &Db, item: &Claimed, owner: &str, outcome: Outcome<'_>) -> anyhow::Result<bool> {
    let now = now_ms();
    let mut tx = db.writer.begin().await?;
    let (completion_id, cache_hit, pt, ct) = match outcome {
        Outcome::Fresh(c) => {
            let o = c.output;
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO completions (cache_key, teacher_identity, endpoint, request, text, finish_reason,
                     prompt_tokens, completion_tokens, latency_ms, model, system_fingerprint, http_attempts, created_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                 ON CONFLICT (cache_key) DO UPDATE SET cache_key = excluded.cache_key
                 RETURNING id",
            )
            .bind(&item.cache_key)
            .bind(c.teacher_identity)
            .bind(c.endpoint.as_str())
            .bind(&c.request)
            .bind(&o.text)
            .bind(&o.finish_reason)
            .bind(o.prompt_tokens)
            .bind(o.completion_tokens)
            .bind(o.latency.as_millis() as i64)
            .bind(&o.model)
            .bind(&o.system_fingerprint)
            .bind(o.http_attempts as i64)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            (id, 0i64, o.prompt_tokens, o.completion_tokens)
        }
        Outcome::CacheHit(c) => (c.id, 1i64, c.prompt_tokens, c.completion_tokens),
    };
    let applied = sqlx::query(
        "UPDATE generations
            SET status = 'done', completion_id = ?, cache_hit = ?, finished_at = ?, last_error = NULL,
                lease_owner = NULL, lease_expires_at = NULL
          WHERE id = ? AND status = 'running' AND lease_owner = ? AND attempts = ?",
    )
    .bind(completion_id)
    .bind(cache_hit)
    .bind(now)
    .bind(item.id)
    .bind(owner)
    .bind(item.attempts)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if applied {
        sqlx::query(
            "UPDATE jobs SET prompt_tokens = prompt_tokens + ?, completion_tokens = completion_tokens + ?,
                 cache_hits = cache_hits + ?, updated_at = ? WHERE id = ?",
        )
        .bind(pt.unwrap_or(0))
        .bind(ct.unwrap_or(0))
        .bind(cache_hit)
        .bind(now)
        .bind(item.job_id)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(applied)
}

/// Records a failed attempt: back to the queue at `retry_at` while attempts remain, else failed.
pub async fn fail(
    db: &Db,
    item: &Claimed,
    owner: &str,
    error: &str,
    retry_at: Option<i64>,
    max_attempts: u32,
) -> anyhow::Result<bool> {
    let now = now_ms();
    let requeue = retry_at.is_some() && item.attempts < max_attempts as i64;
    let applied = sqlx::query(
        "UPDATE generations
            SET status = ?, run_at = ?, last_error = ?, finished_at = ?, lease_owner = NULL, lease_expires_at = NULL
          WHERE id = ? AND status = 'running' AND lease_owner = ? AND attempts = ?",
    )
    .bind(if requeue { "queued" } else { "failed" })
    .bind(retry_at.unwrap_or(0))
    .bind(error)
    .bind(if requeue { None } else { Some(now) })
    .bind(item.id)
    .bind(owner)
    .bind(item.attempts)
    .execute(&db.writer)
    .await?
    .rows_affected()
        == 1;
    Ok(applied)
}

/// Extends the leases of everything `owner` holds.
pub async fn heartbeat(db: &Db, owner: &str, lease: Duration) -> anyhow::Result<u64> {
    Ok(sqlx::query("UPDATE generations SET lease_expires_at = ? WHERE status = 'running' AND lease_owner = ?")
        .bind(now_ms() + lease.as_millis() as i64)
        .bind(owner)
        .execute(&db.writer)
        .await?
        .rows_affected())
}

/// Returns items whose lease ran out to the queue (or fails them once out of attempts).
pub async fn requeue_expired(db: &Db, max_attempts: u32) -> anyhow::Result<u64> {
    let now = now_ms();
    Ok(sqlx::query(
        "UPDATE generations
            SET status = CASE WHEN attempts >= ?1 THEN 'failed' ELSE 'queued' END,
                finished_at = CASE WHEN attempts >= ?1 THEN ?2 ELSE NULL END,
                last_error = 'lease expired: the worker holding it stopped answering',
                lease_owner = NULL, lease_expires_at = NULL
          WHERE status = 'running' AND lease_expires_at < ?2",
    )
    .bind(max_attempts as i64)
    .bind(now)
    .execute(&db.writer)
    .await?
    .rows_affected())
}

/// At start-up, with the database lock held, every running item belongs to a dead process:
/// hand them all back at once instead of waiting for their leases to expire.
pub async fn recover_all(db: &Db) -> anyhow::Result<u64> {
    Ok(sqlx::query(
        "UPDATE generations SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL,
             last_error = 'requeued at start-up: the previous server stopped while it was in flight'
         WHERE status = 'running'",
    )
    .execute(&db.writer)
    .await?
    .rows_affected())
}

/// Gives back whatever `owner` still holds (after a shutdown drain timed out).
pub async fn release(db: &Db, owner: &str) -> anyhow::Result<u64> {
    Ok(sqlx::query(
        "UPDATE generations SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL
         WHERE status = 'running' AND lease_owner = ?",
    )
    .bind(owner)
    .execute(&db.writer)
    .await?
    .rows_affected())
}
