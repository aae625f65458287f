//! Continuous batching on one engine thread: requests join the running batch as soon as they
//! arrive (their prompt is processed in the same forward call as the others' next tokens),
//! and leave it when they stop. Every step is one batched forward over all active sequences.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::llama::{argmax, Chunk, KvCache, Llama};
use super::logprobs::top_k;
use crate::soft_labels::Position;

/// One greedy generation.
pub struct Job {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    /// Token ids that end the answer (EOS, end of turn); the stop token is kept in the output.
    pub stop_ids: Vec<u32>,
    /// Called with the ids so far; returns true when a stop string has appeared.
    pub stop_check: Option<Box<dyn Fn(&[u32]) -> bool + Send>>,
    /// Soft labels: the top-k log-probabilities recorded at every answer position (0: none).
    pub top_k: usize,
    /// Teacher forcing: score these answer ids (one forward pass, no decoding) instead of
    /// generating. The result's `ids` are these, `finish` is `stop` when the last is a stop id.
    pub score: Option<Vec<u32>>,
    pub reply: oneshot::Sender<Result<Generated, String>>,
}

/// What the engine produced.
#[derive(Debug, Clone)]
pub struct Generated {
    pub ids: Vec<u32>,
    /// `stop` (a stop id or stop string) or `length`.
    pub finish: &'static str,
    pub elapsed: Duration,
    /// One per id in `ids` when the job asked for `top_k` > 0 (see `engine::logprobs`).
    pub soft_labels: Vec<Position>,
}

struct Active {
    job: Job,
    cache: KvCache,
    out: Vec<u32>,
    soft: Vec<Position>,
    stage: Stage,
    started: Instant,
}

/// Where a sequence is: what the next forward call feeds it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stage {
    /// The prompt is still to be processed.
    Prompt,
    /// Decoding: this token is the next input.
    Next(u32),
    /// Scoring: the prompt but its last token is cached; the last prompt token and the answer
    /// go next, with logits for every row.
    Score,
    /// Scored: nothing more to do.
    Scored,
}

/// Handle to the engine thread.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::Sender<Job>,
}

impl Scheduler {
    /// Starts the engine thread; at most `max_batch` sequences decode together.
    pub fn start(model: Llama, max_batch: usize) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                // The loop runs on a worker of the engine's own pool, so every parallel product
                // is split among workers directly instead of being handed over and waited for
                // (which cost a context switch per product).
                match rayon::ThreadPoolBuilder::new().num_threads(threads).thread_name(|i| format!("engine-{i}")).build() {
                    Ok(pool) => pool.install(|| run(model, rx, max_batch.max(1))),
                    Err(_) => run(model, rx, max_batch.max(1)),
                }
            })
            .expect("engine thread starts");
        Scheduler { tx }
    }

    pub fn submit(&self, job: Job) -> Result<(), String> {
        self.tx.send(job).map_err(|_| "the engine thread has stopped".to_string())
    }
}

fn run(mut model: Llama, rx: mpsc::Receiver<Job>, max_batch: usize) {
    let mut active: Vec<Active> = Vec::new();
    let mut waiting: std::collections::VecDeque<Job> = Default::default();
    loop {
        // Block only when idle; otherwise take whatever has arrived.
        if active.is_empty() && waiting.is_empty() {
            match rx.recv() {
                Ok(j) => waiting.push_back(j),
                Err(_) => return,
            }
        }
        while let Ok(j) = rx.try_recv() {
            waiting.push_back(j);
        }
        while active.len() < max_batch {
            let Some(job) = waiting.pop_front() else { break };
            if job.prompt.is_empty() {
                let _ = job.reply.send(Err("empty prompt".into()));
                continue;
            }
            let (more, what) = match &job.score {
                Some(a) if a.is_empty() => {
                    let _ = job.reply.send(Err("the answer to score has no tokens".into()));
                    continue;
                }
                Some(a) => (a.len(), "an answer of"),
                None => (job.max_new_tokens, "max_new_tokens"),
            };
            let need = job.prompt.len() + more;
            if need > model.cfg.context {
                let _ = job.reply.send(Err(format!(
                    "prompt of {} tokens plus {what} {more} exceeds the model's context of {}",
                    job.prompt.len(),
                    model.cfg.context
                )));
                continue;
            }
            if need > model.max_positions() {
                model.reserve_positions(need.next_power_of_two());
            }
            active.push(Active {
                cache: KvCache::new(&model.cfg),
                out: Vec::new(),
                soft: Vec::new(),
                stage: Stage::Prompt,
                started: Instant::now(),
                job,
            });
        }
        let step = catch_unwind(AssertUnwindSafe(|| step(&model, &mut active)));
        match step {
            Ok(Ok(())) => {}
            Ok(Err(e)) => fail_all(&mut active, &format!("engine error: {e:#}")),
            Err(panic) => {
                let msg = panic.downcast_ref::<&str>().map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(%msg, "engine panicked; failing its in-flight requests");
                fail_all(&mut active, &format!("engine panicked: {msg}"));
            }
        }
        // Retire finished sequences. A stop check that panics fails only its own request.
        let mut i = 0;
        while i < active.len() {
            match catch_unwind(AssertUnwindSafe(|| finished(&active[i]))) {
                Ok(Some(finish)) => {
                    let a = active.swap_remove(i);
                    let done = Generated { ids: a.out, finish, elapsed: a.started.elapsed(), soft_labels: a.soft };
                    let _ = a.job.reply.send(Ok(done));
                }
                Ok(None) => i += 1,
                Err(_) => {
                    let a = active.swap_remove(i);
                    let _ = a.job.reply.send(Err("engine panicked while checking stop conditions".into()));
                }
            }
        }
    }
}

fn fail_all(active: &mut Vec<Active>, msg: &str) {
    for a in active.drain(..) {
        let _ = a.job.reply.send(Err(msg.to_string()));
    }
}

fn finished(a: &Active) -> Option<&'static str> {
    if a.job.score.is_some() {
        if a.stage != Stage::Scored {
            return None;
        }
        let last = *a.out.last()?;
        return Some(if a.job.stop_ids.contains(&last) { "stop" } else { "length" });
    }
    let last = *a.out.last()?;
    if a.job.stop_ids.contains(&last) {
        return Some("stop");
    }
    if a.job.stop_check.as_ref().is_some_and(|f| f(&a.out)) {
        return Some("stop");
    }
    (a.out.len() >= a.job.max_new_tokens).then_some("length")
}

/// What one sequence feeds the next forward call, and whether it needs every row's logits.
fn input(a: &Active) -> (Vec<u32>, bool) {
    let prompt = &a.job.prompt;
    match (a.stage, &a.job.score) {
        (Stage::Prompt, None) => (prompt.clone(), false),
        // Everything but the last prompt token first, so that the scoring call's logits are
        // exactly the rows that predict answer tokens.
        (Stage::Prompt, Some(_)) if prompt.len() > 1 => (prompt[..prompt.len() - 1].to_vec(), false),
        (Stage::Prompt | Stage::Score, Some(answer)) => {
            let mut t = vec![*prompt.last().expect("non-empty")];
            t.extend_from_slice(&answer[..answer.len() - 1]);
            (t, true)
        }
        (Stage::Next(t), _) => (vec![t], false),
        (Stage::Score | Stage::Scored, None) | (Stage::Scored, Some(_)) => (Vec::new(), false),
    }
}

/// One forward over every active sequence: new ones feed their prompt, the others one token
/// (or, when scoring, the whole answer).
fn step(model: &Llama, active: &mut [Active]) -> anyhow::Result<()> {
    if active.is_empty() {
        return Ok(());
    }
    let inputs: Vec<(Vec<u32>, bool)> = active.iter().map(input).collect();
    let mut chunks: Vec<Chunk> = active
        .iter_mut()
        .zip(&inputs)
        .map(|(a, (toks, all))| Chunk { cache: &mut a.cache, tokens: toks, all_logits: *all })
        .collect();
    let logits = model.forward(&mut chunks)?;
    let vocab = model.cfg.vocab;
    for ((a, l), (_, all)) in active.iter_mut().zip(logits).zip(&inputs) {
        if let Some(answer) = &a.job.score {
            if *all {
                for (row, &id) in l.chunks_exact(vocab).zip(answer) {
                    a.soft.push(top_k(row, a.job.top_k, id));
                }
                a.out = answer.clone();
                a.stage = Stage::Scored;
            } else {
                a.stage = Stage::Score;
            }
            continue;
        }
        let t = argmax(&l);
        if a.job.top_k > 0 {
            a.soft.push(top_k(&l, a.job.top_k, t));
        }
        a.out.push(t);
        a.stage = Stage::Next(t);
    }
    Ok(())
}
