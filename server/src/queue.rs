//! The durable queue over `generations`: claim, heartbeat, complete, fail, recover.
//!
//! A claim is one `UPDATE … RETURNING` that sets status, lease owner and expiry and bumps
//! `attempts`. Every later write on the item is fenced by (lease owner, attempts): a worker whose
//! lease expired and was taken over cannot overwrite the new owner's result. No transaction is
//! ever held open across a teacher call.

use std::time::Duration;

use std::collections::HashMap;

use sqlx::{FromRow, QueryBuilder, Sqlite};

use crate::db::Db;
use crate::domain::job::Endpoint;
use crate::store::prompt_sets::PromptRow;
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

const CLAIM_SQL: &str = "UPDATE generations
        SET status = 'running', attempts = attempts + 1, lease_owner = ?1, lease_expires_at = ?2,
            started_at = coalesce(started_at, ?3)
      WHERE id IN (
            SELECT g.id FROM jobs j
              JOIN generations g ON g.job_id = j.id AND g.status = 'queued'
             WHERE j.teacher = ?4 AND j.status IN ('queued', 'running') AND g.run_at <= ?3
             ORDER BY j.id, g.id
             LIMIT ?5)
  RETURNING id, job_id, prompt_id, attempts, cache_key";

/// Claims up to `n` claimable items of active jobs that use `teacher`, oldest job first.
/// One statement; the `generations_claimed` trigger marks a queued job running.
pub async fn claim<'c, E>(conn: E, teacher: &str, owner: &str, n: usize, lease: Duration) -> anyhow::Result<Vec<Claimed>>
where
    E: sqlx::Executor<'c, Database = Sqlite>,
{
    let now = now_ms();
    let mut rows: Vec<Claimed> = sqlx::query_as(CLAIM_SQL)
        .bind(owner)
        .bind(now + lease.as_millis() as i64)
        .bind(now)
        .bind(teacher)
        .bind(n as i64)
        .fetch_all(conn)
        .await?;
    rows.sort_by_key(|c| (c.job_id, c.id));
    Ok(rows)
}

/// A claimed item's prompt, and the completion already cached for its key, if any.
#[derive(Debug, Clone, FromRow)]
pub struct ItemInput {
    #[sqlx(flatten)]
    pub prompt: PromptRow,
    pub cached_completion: Option<i64>,
}

/// Reads what an item needs in one query.
pub async fn input(db: &Db, item: &Claimed) -> anyhow::Result<ItemInput> {
    Ok(sqlx::query_as(
        "SELECT p.id, p.position, p.external_id, p.prompt, p.messages, p.system, p.metadata,
                (SELECT c.id FROM completions c WHERE c.cache_key = ?1) AS cached_completion
           FROM prompts p WHERE p.id = ?2",
    )
    .bind(&item.cache_key)
    .bind(item.prompt_id)
    .fetch_one(&db.reader)
    .await?)
}

/// Token ids as stored: little-endian u32s.
pub fn ids_blob(ids: &[u32]) -> Vec<u8> {
    ids.iter().flat_map(|i| i.to_le_bytes()).collect()
}

/// The inverse of [`ids_blob`].
pub fn blob_ids(blob: &[u8]) -> Vec<u32> {
    blob.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// A fresh teacher answer to record.
#[derive(Debug, Clone)]
pub struct NewCompletion {
    pub teacher_identity: String,
    pub endpoint: Endpoint,
    pub request: String,
    pub output: GenerateOutput,
    /// `output.soft_labels` encoded (`soft_labels::encode`), checked before it gets here.
    pub soft_labels: Option<Vec<u8>>,
}

/// Where a finished item's completion comes from.
#[derive(Debug, Clone)]
pub enum Outcome {
    Fresh(NewCompletion),
    CacheHit { completion_id: i64 },
}

/// A finished item waiting to be recorded.
#[derive(Debug, Clone)]
pub struct Finished {
    pub item: Claimed,
    pub outcome: Outcome,
}

/// Records finished items in one transaction (group commit). Fresh completions are stored, and
/// so cached, even when the fence fails (e.g. the job was cancelled meanwhile). Returns, per
/// item, whether it was still ours to finish.
/// In the same transaction it claims `wants[t]` new items for each teacher `t`, so a worker
/// can go straight on to its next item.
pub async fn complete_batch(
    db: &Db,
    owner: &str,
    batch: &[Finished],
    wants: &[(String, usize)],
    lease: Duration,
) -> anyhow::Result<(Vec<bool>, HashMap<String, Vec<Claimed>>)> {
    let now = now_ms();
    let mut tx = db.writer.begin().await?;
    let mut ids: HashMap<String, i64> = HashMap::new();
    let fresh: Vec<(&Claimed, &NewCompletion)> = batch
        .iter()
        .filter_map(|f| match &f.outcome {
            Outcome::Fresh(c) => Some((&f.item, c)),
            Outcome::CacheHit { .. } => None,
        })
        .collect();
    for chunk in fresh.chunks(150) {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO completions (cache_key, teacher_identity, endpoint, request, text, finish_reason,
                 prompt_tokens, completion_tokens, latency_ms, model, system_fingerprint, http_attempts, created_at,
                 prompt_token_ids, completion_token_ids, soft_labels) ",
        );
        qb.push_values(chunk, |mut b, (item, c)| {
            let o = &c.output;
            b.push_bind(&item.cache_key)
                .push_bind(&c.teacher_identity)
                .push_bind(c.endpoint.as_str())
                .push_bind(&c.request)
                .push_bind(&o.text)
                .push_bind(&o.finish_reason)
                .push_bind(o.prompt_tokens)
                .push_bind(o.completion_tokens)
                .push_bind(o.latency.as_millis() as i64)
                .push_bind(&o.model)
                .push_bind(&o.system_fingerprint)
                .push_bind(o.http_attempts as i64)
                .push_bind(now)
                .push_bind(o.prompt_token_ids.as_deref().map(ids_blob))
                .push_bind(o.completion_token_ids.as_deref().map(ids_blob))
                .push_bind(&c.soft_labels);
        });
        qb.push(" ON CONFLICT (cache_key) DO UPDATE SET cache_key = excluded.cache_key RETURNING id, cache_key");
        let rows: Vec<(i64, String)> = qb.build_query_as().fetch_all(&mut *tx).await?;
        ids.extend(rows.into_iter().map(|(id, key)| (key, id)));
    }
    let mut applied: HashMap<i64, ()> = HashMap::new();
    for chunk in batch.chunks(500) {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
            "UPDATE generations
                SET status = 'done', completion_id = v.column2, cache_hit = v.column3, finished_at = ",
        );
        qb.push_bind(now);
        qb.push(", last_error = NULL, lease_owner = NULL, lease_expires_at = NULL FROM (");
        qb.push_values(chunk, |mut b, f| {
            let (completion, hit) = match &f.outcome {
                Outcome::Fresh(_) => (ids.get(&f.item.cache_key).copied(), 0i64),
                Outcome::CacheHit { completion_id } => (Some(*completion_id), 1i64),
            };
            b.push_bind(f.item.id).push_bind(completion).push_bind(hit).push_bind(f.item.attempts);
        });
        qb.push(") AS v WHERE generations.id = v.column1 AND generations.status = 'running' AND generations.attempts = v.column4 AND generations.lease_owner = ");
        qb.push_bind(owner);
        qb.push(" RETURNING id");
        let rows: Vec<(i64,)> = qb.build_query_as().fetch_all(&mut *tx).await?;
        applied.extend(rows.into_iter().map(|(id,)| (id, ())));
    }
    let mut claimed = HashMap::new();
    for (teacher, n) in wants {
        if *n > 0 {
            claimed.insert(teacher.clone(), claim(&mut *tx, teacher, owner, *n, lease).await?);
        }
    }
    tx.commit().await?;
    Ok((batch.iter().map(|f| applied.contains_key(&f.item.id)).collect(), claimed))
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
