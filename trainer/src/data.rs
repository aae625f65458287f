//! Training data: the teacher's done answers read from the server's SQLite database (schema in
//! docs/schema.md), turned into token sequences with the loss on answer tokens only, split
//! deterministically by prompt hash, and packed several examples per row.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{Row, SqlitePool};

use server::domain::prompt_set::Message;
use server::model::chat_template::ChatTemplate;
use server::model::tokenizer::ModelTokenizer;
use server::soft_labels::Position;

/// Which answers to train on.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Only these jobs (all jobs when empty).
    pub jobs: Vec<i64>,
    /// Also answers cut off by max_new_tokens (by default only answers that ended with a stop).
    pub include_truncated: bool,
}

/// One done generation as stored.
#[derive(Debug, Clone)]
pub struct Record {
    pub generation_id: i64,
    pub job_id: i64,
    pub endpoint: String,
    /// JSON messages (chat) or the prompt text (completions), as sent to the teacher.
    pub request: String,
    pub text: String,
    pub finish_reason: Option<String>,
    pub prompt_token_ids: Option<Vec<u32>>,
    pub completion_token_ids: Option<Vec<u32>>,
    pub teacher_identity: String,
    /// The stored soft-label blob, when the job recorded logprobs.
    pub soft_labels: Option<Vec<u8>>,
}

/// One training example: the loss is on `answer` only.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub generation_id: i64,
    pub prompt: Vec<u32>,
    pub answer: Vec<u32>,
    /// Hash of the prompt: the train/validation split and nothing else.
    pub split_hash: u64,
    /// The teacher's top-k for each answer token (KD runs only; aligned with `answer`).
    pub soft_labels: Option<Vec<Position>>,
}

impl Example {
    pub fn len(&self) -> usize {
        self.prompt.len() + self.answer.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Opens the database read-only and checks it is one the server wrote, at our schema version.
pub async fn open(path: &Path) -> anyhow::Result<SqlitePool> {
    if !path.is_file() {
        bail!("{} does not exist; pass the gen.sqlite the server filled (--from-db)", path.display());
    }
    let mut header = [0u8; 16];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        if f.read(&mut header).unwrap_or(0) < 16 || &header != b"SQLite format 3\0" {
            bail!("{} is not an SQLite database; pass the gen.sqlite the server filled (--from-db)", path.display());
        }
    }
    let opts = SqliteConnectOptions::new().filename(path).read_only(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await
        .with_context(|| format!("cannot open {} as SQLite", path.display()))?;
    let version: Option<String> = sqlx::query_scalar("SELECT value FROM meta WHERE key = 'schema_version'")
        .fetch_optional(&pool)
        .await
        .map_err(|_| {
            anyhow::anyhow!("{} has no `meta` table: it was not written by the distill server", path.display())
        })?;
    let want = server::db::SCHEMA_VERSION;
    match version.as_deref().map(str::parse::<i64>) {
        Some(Ok(v)) if v == want => Ok(pool),
        Some(Ok(v)) if v < want => bail!(
            "{} has schema version {v}; this trainer reads version {want}. Open it once with the current server \
             (it migrates on start), then train",
            path.display()
        ),
        Some(Ok(v)) => bail!(
            "{} has schema version {v}, newer than this trainer's {want}; use a trainer from the same release as the server",
            path.display()
        ),
        _ => bail!("{} has no readable schema_version in `meta`", path.display()),
    }
}

fn blob_ids(b: Option<Vec<u8>>) -> Option<Vec<u32>> {
    b.map(|b| server::queue::blob_ids(&b))
}

/// Done generations of the selected jobs, oldest first; one per distinct completion (a cache
/// hit in a second job is the same answer, not a second example).
pub async fn records(pool: &SqlitePool, sel: &Selection) -> anyhow::Result<Vec<Record>> {
    let existing: Vec<i64> = sqlx::query_scalar("SELECT id FROM jobs").fetch_all(pool).await?;
    for j in &sel.jobs {
        if !existing.contains(j) {
            bail!("job {j} is not in the database (jobs: {existing:?}); fix --job");
        }
    }
    let rows = sqlx::query(
        "SELECT g.id, g.job_id, c.id AS cid, c.endpoint, c.request, c.text, c.finish_reason,
                c.prompt_token_ids, c.completion_token_ids, c.teacher_identity, c.soft_labels
           FROM generations g JOIN completions c ON c.id = g.completion_id
          WHERE g.status = 'done'
          ORDER BY g.id",
    )
    .fetch_all(pool)
    .await?;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for r in rows {
        let job_id: i64 = r.get("job_id");
        if !sel.jobs.is_empty() && !sel.jobs.contains(&job_id) {
            continue;
        }
        let finish: Option<String> = r.get("finish_reason");
        if !sel.include_truncated && finish.as_deref() != Some("stop") {
            continue;
        }
        if !seen.insert(r.get::<i64, _>("cid")) {
            continue;
        }
        out.push(Record {
            generation_id: r.get("id"),
            job_id,
            endpoint: r.get("endpoint"),
            request: r.get("request"),
            text: r.get("text"),
            finish_reason: finish,
            prompt_token_ids: blob_ids(r.get("prompt_token_ids")),
            completion_token_ids: blob_ids(r.get("completion_token_ids")),
            teacher_identity: r.get("teacher_identity"),
            soft_labels: r.get("soft_labels"),
        });
    }
    if out.is_empty() {
        bail!(
            "no done answers to train on{}{}; run a job to completion first (or pass --include-truncated)",
            if sel.jobs.is_empty() { String::new() } else { format!(" in jobs {:?}", sel.jobs) },
            if sel.include_truncated { "" } else { " that ended with a stop" }
        );
    }
    Ok(out)
}

/// How prompts and answers become token ids for the student.
pub struct Encoder<'a> {
    pub tokenizer: &'a ModelTokenizer,
    pub template: &'a ChatTemplate,
    /// Use the teacher's recorded ids where present (the student shares the teacher's tokenizer).
    pub use_teacher_ids: bool,
    /// Attach the soft labels (KD): every example must have them, on the teacher's own ids.
    pub soft_labels: bool,
}

/// Counts of what `encode` did, for the log.
#[derive(Debug, Default, Clone)]
pub struct EncodeStats {
    pub from_teacher_ids: usize,
    pub rendered: usize,
    /// Records with ids whose re-rendered prompt gave different ids (the tokenizer or template
    /// differs from the teacher's).
    pub prompt_mismatch: usize,
}

fn split_hash(request: &str) -> u64 {
    let h = Sha256::digest(request.as_bytes());
    u64::from_le_bytes(h[..8].try_into().unwrap())
}

impl Encoder<'_> {
    /// The prompt as the teacher saw it: the chat template over the stored messages, or the
    /// stored completion prompt, tokenized with special tokens parsed.
    pub fn render_prompt(&self, r: &Record) -> anyhow::Result<Vec<u32>> {
        let text = match r.endpoint.as_str() {
            "chat" => {
                let messages: Vec<Message> = serde_json::from_str(&r.request)
                    .with_context(|| format!("generation {}: stored request is not a message list", r.generation_id))?;
                self.template.render(&messages)?
            }
            _ => r.request.clone(),
        };
        let mut ids = Vec::new();
        if self.tokenizer.special.add_bos {
            ids.extend(self.tokenizer.special.bos);
        }
        ids.extend(self.tokenizer.encode(&text, true)?);
        Ok(ids)
    }

    pub fn encode(&self, records: &[Record]) -> anyhow::Result<(Vec<Example>, EncodeStats)> {
        let mut stats = EncodeStats::default();
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            let rendered = self.render_prompt(r)?;
            // Whether the answer ids are the teacher's own (the ones its soft labels sit on).
            let mut teacher_answer = false;
            let (prompt, answer) = match (&r.prompt_token_ids, &r.completion_token_ids) {
                (Some(p), Some(a)) if self.use_teacher_ids => {
                    if *p != rendered {
                        stats.prompt_mismatch += 1;
                    }
                    stats.from_teacher_ids += 1;
                    teacher_answer = true;
                    (p.clone(), a.clone())
                }
                // An OpenAI-compatible teacher reports answer ids only (with soft labels): KD
                // keeps them, as long as the student's tokenizer spells them as the answer.
                (None, Some(a)) if self.soft_labels && self.spells(a, &r.text) => {
                    stats.rendered += 1;
                    teacher_answer = true;
                    let mut a = a.clone();
                    if r.finish_reason.as_deref() == Some("stop") && a.last().is_none_or(|l| !self.tokenizer.special.stop.contains(l)) {
                        a.push(self.tokenizer.special.eos);
                    }
                    (rendered, a)
                }
                _ => {
                    stats.rendered += 1;
                    let mut a = self.tokenizer.encode(&r.text, false)?;
                    // An answer that ended with a stop ends with the end-of-turn token, which the
                    // student must learn to produce too.
                    if r.finish_reason.as_deref() == Some("stop") {
                        a.push(self.tokenizer.special.eos);
                    }
                    (rendered, a)
                }
            };
            if answer.is_empty() {
                continue;
            }
            let vocab = self.tokenizer.vocab_size as u32;
            if let Some(bad) = prompt.iter().chain(&answer).find(|&&t| t >= vocab) {
                bail!("generation {}: token id {bad} is outside the student's vocabulary ({vocab})", r.generation_id);
            }
            let soft_labels = if self.soft_labels { Some(self.soft_labels_of(r, &answer, teacher_answer)?) } else { None };
            out.push(Example { generation_id: r.generation_id, prompt, answer, split_hash: split_hash(&r.request), soft_labels });
        }
        Ok((out, stats))
    }
}

impl Encoder<'_> {
    /// Whether the student's tokenizer decodes the teacher's answer ids to the answer's text
    /// (then both share the vocabulary, at least on this answer).
    fn spells(&self, ids: &[u32], text: &str) -> bool {
        let vocab = self.tokenizer.vocab_size as u32;
        ids.iter().all(|&t| t < vocab) && self.tokenizer.decode(ids, false).is_ok_and(|d| d.trim_start().starts_with(text.trim_start()))
    }

    /// A record's soft labels for KD, checked: they exist, they sit on the teacher's own answer
    /// ids (which the student shares), one per answer token, with ids inside the vocabulary.
    /// An end-of-turn token a server did not report (appended here) gets no soft label.
    fn soft_labels_of(&self, r: &Record, answer: &[u32], teacher_answer: bool) -> anyhow::Result<Vec<Position>> {
        let Some(blob) = &r.soft_labels else {
            bail!(
                "--kd: generation {} (job {}) has no soft labels; its job ran without `logprobs`. \
                 Select jobs that recorded them with --job, or train on hard labels without --kd",
                r.generation_id,
                r.job_id
            )
        };
        if !teacher_answer {
            bail!(
                "--kd: the soft labels of generation {} are over the teacher's vocabulary, and the student's tokenizer \
                 does not reproduce the teacher's token ids; KD needs a student with the teacher's vocabulary \
                 (hard labels work across tokenizers: drop --kd)",
                r.generation_id
            );
        }
        let mut positions = server::soft_labels::decode(blob)
            .with_context(|| format!("generation {}: stored soft labels do not decode", r.generation_id))?;
        if positions.len() + 1 == answer.len() && r.completion_token_ids.as_ref().is_some_and(|a| a.len() == positions.len()) {
            let k = positions.first().map_or(0, |p| p.top.len());
            positions.push(Position { chosen_logprob: f32::NEG_INFINITY, top: vec![(0, f32::NEG_INFINITY); k] });
        }
        if positions.len() != answer.len() {
            bail!(
                "generation {}: {} soft-label positions for {} answer tokens; the database is inconsistent",
                r.generation_id,
                positions.len(),
                answer.len()
            );
        }
        let vocab = self.tokenizer.vocab_size as u32;
        if let Some(bad) = positions.iter().flat_map(|p| &p.top).find(|t| t.0 >= vocab) {
            bail!(
                "--kd: generation {}: teacher token id {} is outside the student's vocabulary ({vocab}); \
                 soft labels need the teacher's vocabulary",
                r.generation_id,
                bad.0
            );
        }
        Ok(positions)
    }
}

/// Splits by prompt hash: an example is in validation when its hash falls in the lowest
/// `val_fraction` of the u64 range, so the split does not depend on order, seed or which other
/// rows exist. At least `min_val` examples (the lowest hashes) go to validation, and at least
/// one stays for training.
pub fn split(mut examples: Vec<Example>, val_fraction: f64, min_val: usize) -> anyhow::Result<(Vec<Example>, Vec<Example>)> {
    if examples.len() < 2 {
        bail!("{} usable example(s): need at least 2 (one to train on, one to validate)", examples.len());
    }
    examples.sort_by_key(|e| (e.split_hash, e.generation_id));
    let threshold = (val_fraction.clamp(0.0, 1.0) * u64::MAX as f64) as u64;
    let by_hash = examples.iter().take_while(|e| e.split_hash < threshold).count();
    let n_val = by_hash.max(min_val).min(examples.len() - 1);
    let train = examples.split_off(n_val);
    let mut val = examples;
    let mut train = train;
    val.sort_by_key(|e| e.generation_id);
    train.sort_by_key(|e| e.generation_id);
    Ok((train, val))
}

/// A packed micro-batch: `rows × len` tokens, several examples per row. Position ids restart
/// at 0 for each example and segment ids (1, 2, ... per row; 0 = padding) confine attention to
/// the example, so packing never lets one example see another.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub rows: usize,
    pub len: usize,
    pub input: Vec<u32>,
    pub target: Vec<u32>,
    /// 1 where the target is an answer token (the loss), else 0.
    pub mask: Vec<f32>,
    pub positions: Vec<u32>,
    pub segments: Vec<u32>,
    /// Answer tokens in the batch (= sum of mask).
    pub loss_tokens: usize,
    /// Soft-label pairs per position (0 when the examples carry none).
    pub k: usize,
    /// `rows × len × k` teacher top-k ids for each target (0 where there is none) ...
    pub teacher_ids: Vec<u32>,
    /// ... and their natural-log probabilities (−∞ where there is none).
    pub teacher_logprobs: Vec<f32>,
}

/// One example laid out for the model: inputs and targets shifted by one, the loss mask, and
/// the soft labels of each target (k per position).
struct Laid {
    input: Vec<u32>,
    target: Vec<u32>,
    mask: Vec<f32>,
    teacher_ids: Vec<u32>,
    teacher_logprobs: Vec<f32>,
}

fn lay_out(e: &Example, max_len: usize, k: usize) -> Laid {
    let mut seq: Vec<u32> = e.prompt.iter().chain(&e.answer).copied().collect();
    // Over-long examples keep their end of prompt out: cut the answer's tail instead so the
    // prompt (the context the answer depends on) stays whole where it fits.
    seq.truncate(max_len + 1);
    let n = seq.len() - 1;
    let input = seq[..n].to_vec();
    let target = seq[1..].to_vec();
    let mask = (0..n).map(|t| if t + 1 >= e.prompt.len() { 1.0 } else { 0.0 }).collect();
    let (mut teacher_ids, mut teacher_logprobs) = (vec![0u32; n * k], vec![f32::NEG_INFINITY; n * k]);
    if let Some(soft) = &e.soft_labels {
        // Target t is answer token t + 1 − prompt length; its soft labels are that position's.
        for t in e.prompt.len().saturating_sub(1)..n {
            let pos = &soft[t + 1 - e.prompt.len()];
            for (j, &(id, lp)) in pos.top.iter().take(k).enumerate() {
                teacher_ids[t * k + j] = id;
                teacher_logprobs[t * k + j] = lp;
            }
        }
    }
    Laid { input, target, mask, teacher_ids, teacher_logprobs }
}

/// Packs examples in the given order, first fit into rows of `max_len` tokens, `rows` rows per
/// micro-batch. Examples longer than `max_len + 1` tokens are truncated to fit. Soft labels
/// come along when the examples have them (k: the largest of theirs; shorter ones are padded
/// with −∞, which carry no teacher mass).
pub fn pack(examples: &[&Example], max_len: usize, rows: usize) -> Vec<Batch> {
    let k = examples.iter().filter_map(|e| e.soft_labels.as_ref()).flat_map(|s| s.first()).map(|p| p.top.len()).max().unwrap_or(0);
    let mut batches = Vec::new();
    let mut row_items: Vec<Vec<Laid>> = Vec::new();
    let mut row_fill: Vec<usize> = Vec::new();
    let flush = |row_items: &mut Vec<Vec<Laid>>, row_fill: &mut Vec<usize>, batches: &mut Vec<Batch>| {
        if row_items.is_empty() {
            return;
        }
        let len = max_len;
        let nrows = rows;
        let mut b = Batch {
            rows: nrows,
            len,
            input: vec![0; nrows * len],
            target: vec![0; nrows * len],
            mask: vec![0.0; nrows * len],
            positions: vec![0; nrows * len],
            segments: vec![0; nrows * len],
            loss_tokens: 0,
            k,
            teacher_ids: vec![0; nrows * len * k],
            teacher_logprobs: vec![f32::NEG_INFINITY; nrows * len * k],
        };
        for (r, items) in row_items.iter().enumerate() {
            let mut at = r * len;
            for (seg, item) in items.iter().enumerate() {
                let n = item.input.len();
                b.input[at..at + n].copy_from_slice(&item.input);
                b.target[at..at + n].copy_from_slice(&item.target);
                b.mask[at..at + n].copy_from_slice(&item.mask);
                for i in 0..n {
                    b.positions[at + i] = i as u32;
                    b.segments[at + i] = seg as u32 + 1;
                }
                b.teacher_ids[at * k..(at + n) * k].copy_from_slice(&item.teacher_ids);
                b.teacher_logprobs[at * k..(at + n) * k].copy_from_slice(&item.teacher_logprobs);
                at += n;
            }
        }
        b.loss_tokens = b.mask.iter().filter(|m| **m > 0.0).count();
        batches.push(b);
        row_items.clear();
        row_fill.clear();
    };
    for e in examples {
        let item = lay_out(e, max_len, k);
        let n = item.input.len();
        if n == 0 {
            continue;
        }
        match row_fill.iter().position(|f| f + n <= max_len) {
            Some(r) => {
                row_fill[r] += n;
                row_items[r].push(item);
            }
            None if row_items.len() < rows => {
                row_fill.push(n);
                row_items.push(vec![item]);
            }
            None => {
                flush(&mut row_items, &mut row_fill, &mut batches);
                row_fill.push(n);
                row_items.push(vec![item]);
            }
        }
    }
    flush(&mut row_items, &mut row_fill, &mut batches);
    batches
}
