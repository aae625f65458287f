//! Workers: one dispatcher per teacher keeps up to `max_in_flight` requests running by claiming
//! items, calling the teacher outside any transaction, and committing each answer on arrival.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::db::Db;
use crate::domain::job::{JobMode, JobParams};
use crate::domain::render::{render, JobTemplate};
use crate::metrics::{global as metrics, Outcome as MetricOutcome, TeacherLabel, TokenKind, TokenLabel};
use crate::queue::{self, Claimed, Finished, NewCompletion, Outcome};
use crate::recorder::Recorder;
use crate::store;
use crate::teacher::{GenerateRequest, Teacher, TeacherError};

/// How often idle dispatchers look for work when nobody wakes them.
const IDLE_POLL: Duration = Duration::from_millis(250);
/// Delay before an item whose retries ran out is claimable again, per attempt.
const REQUEUE_DELAY: Duration = Duration::from_secs(10);

/// What a job's items need to be rendered, cached per job.
struct JobContext {
    params: JobParams,
    template: JobTemplate,
    teacher_identity: String,
}

/// Shared by all dispatchers of this process.
pub struct WorkerShared {
    pub db: Db,
    /// Lease owner id of this process: unique per start.
    pub owner: String,
    pub lease: Duration,
    pub max_attempts: u32,
    /// Wakes idle dispatchers when work arrives (new job, resume, retry).
    pub wake: Notify,
    jobs: Mutex<HashMap<i64, Arc<JobContext>>>,
    recorder: Recorder,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

/// Handle to the running workers.
pub struct Workers {
    pub shared: Arc<WorkerShared>,
    loops: Vec<tokio::task::JoinHandle<()>>,
}

impl Workers {
    pub fn start(db: Db, teachers: Vec<Arc<dyn Teacher>>, lease: Duration, max_attempts: u32) -> Self {
        let owner = format!("{}-{:016x}", std::process::id(), rand::random::<u64>());
        let shared = Arc::new(WorkerShared {
            recorder: Recorder::start(db.clone(), owner.clone(), lease),
            db,
            owner,
            lease,
            max_attempts,
            wake: Notify::new(),
            jobs: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
        });
        let mut loops: Vec<_> = teachers
            .into_iter()
            .map(|t| tokio::spawn(dispatch(Arc::clone(&shared), t)))
            .collect();
        loops.push(tokio::spawn(maintain(Arc::clone(&shared))));
        Workers { shared, loops }
    }

    /// Stops claiming, waits up to `drain` for in-flight requests, then gives back what is left.
    pub async fn shutdown(self, drain: Duration) {
        let s = &self.shared;
        s.shutdown.cancel();
        s.wake.notify_waiters();
        s.tracker.close();
        if tokio::time::timeout(drain, s.tracker.wait()).await.is_err() {
            tracing::warn!("drain timed out; in-flight items go back to the queue");
        }
        for l in self.loops {
            l.abort();
        }
        match queue::release(&s.db, &s.owner).await {
            Ok(n) if n > 0 => tracing::info!(items = n, "released unfinished items"),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "could not release leases; they expire on their own"),
        }
        if let Err(e) = store::jobs::finish_completed(&s.db).await {
            tracing::warn!(error = %e, "could not update finished jobs");
        }
    }
}

async fn dispatch(shared: Arc<WorkerShared>, teacher: Arc<dyn Teacher>) {
    let slots = Arc::new(Semaphore::new(teacher.max_in_flight()));
    loop {
        let first = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => p.expect("never closed"),
            _ = shared.shutdown.cancelled() => return,
        };
        let mut permits = vec![first];
        while let Ok(p) = Arc::clone(&slots).try_acquire_owned() {
            permits.push(p);
        }
        let claimed = match queue::claim(&shared.db.writer, teacher.name(), &shared.owner, permits.len(), shared.lease).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(teacher = teacher.name(), error = %e, "claim failed");
                Vec::new()
            }
        };
        if claimed.is_empty() {
            drop(permits);
            tokio::select! {
                _ = shared.wake.notified() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
                _ = shared.shutdown.cancelled() => return,
            }
            continue;
        }
        for (item, permit) in claimed.into_iter().zip(permits) {
            let shared = Arc::clone(&shared);
            let teacher = Arc::clone(&teacher);
            shared.tracker.clone().spawn(async move {
                // Keep the slot while the recorder hands over next items.
                let mut next = Some(item);
                while let Some(item) = next.take() {
                    next = process(&shared, teacher.as_ref(), item).await;
                    if shared.shutdown.is_cancelled() {
                        // Draining: a next item claimed meanwhile is not started; shutdown
                        // releases it back to the queue.
                        break;
                    }
                }
                drop(permit);
            });
        }
    }
}

/// Keeps leases alive, returns expired ones, and marks finished jobs done.
async fn maintain(shared: Arc<WorkerShared>) {
    let tick = Duration::from_millis(100);
    let beat_every = (shared.lease / 3).max(tick);
    let reap_every = Duration::from_secs(1);
    let (mut since_beat, mut since_reap) = (Duration::ZERO, Duration::ZERO);
    loop {
        tokio::time::sleep(tick).await;
        since_beat += tick;
        since_reap += tick;
        if since_beat >= beat_every {
            since_beat = Duration::ZERO;
            if let Err(e) = queue::heartbeat(&shared.db, &shared.owner, shared.lease).await {
                tracing::error!(error = %e, "heartbeat failed");
            }
        }
        if since_reap < reap_every {
            if let Err(e) = store::jobs::finish_completed(&shared.db).await {
                tracing::error!(error = %e, "finishing jobs failed");
            }
            continue;
        }
        since_reap = Duration::ZERO;
        match queue::requeue_expired(&shared.db, shared.max_attempts).await {
            Ok(n) if n > 0 => {
                tracing::warn!(items = n, "requeued items with expired leases");
                shared.wake.notify_waiters();
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "lease recovery failed"),
        }
        if let Err(e) = store::jobs::finish_completed(&shared.db).await {
            tracing::error!(error = %e, "finishing jobs failed");
        }
    }
}

impl WorkerShared {
    async fn job(&self, job_id: i64) -> anyhow::Result<Arc<JobContext>> {
        if let Some(ctx) = self.jobs.lock().unwrap().get(&job_id) {
            return Ok(Arc::clone(ctx));
        }
        let row = store::jobs::get_row(&self.db, job_id).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let params = row.params()?;
        let template = JobTemplate::for_params(&params).map_err(|e| anyhow::anyhow!(e.message))?;
        let ctx = Arc::new(JobContext { params, template, teacher_identity: row.teacher_identity });
        self.jobs.lock().unwrap().insert(job_id, Arc::clone(&ctx));
        Ok(ctx)
    }
}

/// Answers and records one item; returns the next item claimed for this worker, if any.
async fn process(shared: &WorkerShared, teacher: &dyn Teacher, item: Claimed) -> Option<Claimed> {
    let label = TeacherLabel { teacher: teacher.name().to_string() };
    let result = run_item(shared, teacher, &item, &label).await;
    let mut next = None;
    let outcome = match result {
        Ok((ours, claimed)) => {
            next = claimed;
            ours.unwrap_or(MetricOutcome::Discarded)
        }
        Err(ItemError::Retry(msg)) => {
            let retry_at = crate::time::now_ms() + (REQUEUE_DELAY * item.attempts as u32).as_millis() as i64;
            record_failure(shared, &item, &msg, Some(retry_at)).await
        }
        Err(ItemError::Fatal(msg)) => record_failure(shared, &item, &msg, None).await,
        Err(ItemError::Internal(e)) => {
            // The database itself failed; leave the item to its lease and say so loudly.
            tracing::error!(item = item.id, error = format!("{e:#}"), "could not record item");
            MetricOutcome::Discarded
        }
    };
    metrics().outcome(teacher.name(), outcome);
    next
}

async fn record_failure(shared: &WorkerShared, item: &Claimed, msg: &str, retry_at: Option<i64>) -> MetricOutcome {
    match queue::fail(&shared.db, item, &shared.owner, msg, retry_at, shared.max_attempts).await {
        Ok(true) if retry_at.is_some() && item.attempts < shared.max_attempts as i64 => {
            shared.wake.notify_waiters();
            MetricOutcome::Requeued
        }
        Ok(true) => MetricOutcome::Failed,
        Ok(false) => MetricOutcome::Discarded,
        Err(e) => {
            tracing::error!(item = item.id, error = %e, "could not record failure");
            MetricOutcome::Discarded
        }
    }
}

enum ItemError {
    Retry(String),
    Fatal(String),
    Internal(anyhow::Error),
}

impl From<anyhow::Error> for ItemError {
    fn from(e: anyhow::Error) -> Self {
        ItemError::Internal(e)
    }
}

/// Answers one item: the outcome (`None` when the fenced write found the item no longer
/// ours) and the next item the recorder claimed for this worker.
async fn run_item(
    shared: &WorkerShared,
    teacher: &dyn Teacher,
    item: &Claimed,
    label: &TeacherLabel,
) -> Result<(Option<MetricOutcome>, Option<Claimed>), ItemError> {
    let next_for = (!shared.shutdown.is_cancelled()).then(|| teacher.name());
    let job = shared.job(item.job_id).await?;
    if job.teacher_identity != teacher.identity() {
        return Err(ItemError::Fatal(format!(
            "teacher `{}` is now {}, but this job was created for {}; start the server with the original spec",
            teacher.name(),
            teacher.identity(),
            job.teacher_identity
        )));
    }
    let input = queue::input(&shared.db, item).await?;
    if let Some(completion_id) = input.cached_completion {
        let done = Finished { item: item.clone(), outcome: Outcome::CacheHit { completion_id } };
        let (ours, next) = shared.recorder.record(done, next_for).await?;
        return Ok((ours.then_some(MetricOutcome::CacheHit), next));
    }
    let request = input.prompt.with_view(|view| render(&job.params, &job.template, view))?.map_err(ItemError::Fatal)?;
    let (request, answer) = match job.params.mode {
        JobMode::Generate => (request, None),
        JobMode::Rescore => {
            let (shown, answer) = request.split_answer().ok_or_else(|| {
                ItemError::Fatal("a rescore prompt must end with the assistant answer to score".into())
            })?;
            (shown, Some(answer))
        }
    };
    let req = GenerateRequest {
        request,
        max_new_tokens: job.params.max_new_tokens,
        stop: job.params.stop.clone(),
        seed: job.params.seed,
        top_k: job.params.logprobs,
        answer,
    };
    let m = metrics();
    m.in_flight.get_or_create(label).inc();
    let answer = teacher.generate(&req).await;
    m.in_flight.get_or_create(label).dec();
    let output = match answer {
        Ok(o) => o,
        Err(TeacherError::Transient { .. }) => return Err(ItemError::Retry(answer.unwrap_err().to_string())),
        Err(e @ TeacherError::Fatal { .. }) => return Err(ItemError::Fatal(e.to_string())),
    };
    m.latency.get_or_create(label).observe(output.latency.as_secs_f64());
    let tokens = |kind| TokenLabel { teacher: label.teacher.clone(), kind };
    m.tokens.get_or_create(&tokens(TokenKind::Prompt)).inc_by(output.prompt_tokens.unwrap_or(0).max(0) as u64);
    m.tokens.get_or_create(&tokens(TokenKind::Completion)).inc_by(output.completion_tokens.unwrap_or(0).max(0) as u64);
    let soft_labels = soft_label_blob(&job.params, &output).map_err(ItemError::Fatal)?;
    let fresh = NewCompletion {
        teacher_identity: teacher.identity().to_string(),
        endpoint: job.params.endpoint,
        request: req.request.stored(),
        output,
        soft_labels,
    };
    let done = Finished { item: item.clone(), outcome: Outcome::Fresh(fresh) };
    let (ours, next) = shared.recorder.record(done, next_for).await?;
    Ok((ours.then_some(MetricOutcome::Done), next))
}

/// The soft labels a job asked for, encoded for storage; an answer whose soft labels are
/// missing, of the wrong k or not one per answer token fails instead of being stored.
fn soft_label_blob(params: &JobParams, output: &crate::teacher::GenerateOutput) -> Result<Option<Vec<u8>>, String> {
    if params.logprobs == 0 {
        return Ok(None);
    }
    let positions = output.soft_labels.as_deref().ok_or("the teacher returned no soft labels")?;
    if let Some(ids) = &output.completion_token_ids {
        if ids.len() != positions.len() {
            return Err(format!("the teacher returned {} soft-label positions for {} answer tokens", positions.len(), ids.len()));
        }
    }
    let k = params.logprobs as usize;
    if let Some((i, p)) = positions.iter().enumerate().find(|(_, p)| p.top.len() != k) {
        return Err(format!("soft labels at position {i} have {} pairs; the job asked for {k}", p.top.len()));
    }
    crate::soft_labels::encode(positions).map(Some).map_err(|e| format!("soft labels refused: {e}"))
}
