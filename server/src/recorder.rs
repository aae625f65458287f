//! Group commit: workers hand finished items to one task that writes whatever has queued up
//! in a single transaction and then answers each worker. A worker's slot frees only once its
//! answer is committed, so durability per answer is unchanged; the transaction and WAL cost is
//! shared by every answer that arrived meanwhile. The same transaction claims each worker's
//! next item, so a busy worker needs no separate claim.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::db::Db;
use crate::queue::{self, Claimed, Finished};

/// Most items per transaction.
const MAX_BATCH: usize = 256;

/// Whether the item was still ours, and the next item claimed for this worker.
pub type Recorded = (bool, Option<Claimed>);

struct Request {
    finished: Finished,
    /// Teacher to claim a next item for, if the worker wants one.
    next_for: Option<String>,
    reply: oneshot::Sender<Result<Recorded, String>>,
}

#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Request>,
}

impl Recorder {
    pub fn start(db: Db, owner: String, lease: Duration) -> Self {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run(db, owner, lease, rx));
        Recorder { tx }
    }

    /// Commits a finished item and, if `next_for` names a teacher, claims the next item.
    pub async fn record(&self, finished: Finished, next_for: Option<&str>) -> anyhow::Result<Recorded> {
        let (reply, answer) = oneshot::channel();
        let req = Request { finished, next_for: next_for.map(str::to_string), reply };
        self.tx.send(req).await.map_err(|_| anyhow::anyhow!("recorder stopped"))?;
        answer.await.map_err(|_| anyhow::anyhow!("recorder stopped"))?.map_err(anyhow::Error::msg)
    }
}

async fn run(db: Db, owner: String, lease: Duration, mut rx: mpsc::Receiver<Request>) {
    let mut batch: Vec<Request> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let mut wants: HashMap<String, usize> = HashMap::new();
        for r in &batch {
            if let Some(t) = &r.next_for {
                *wants.entry(t.clone()).or_default() += 1;
            }
        }
        let wants: Vec<(String, usize)> = wants.into_iter().collect();
        let items: Vec<Finished> = batch.iter().map(|r| r.finished.clone()).collect();
        match queue::complete_batch(&db, &owner, &items, &wants, lease).await {
            Ok((applied, mut claimed)) => {
                for (r, ok) in batch.drain(..).zip(applied) {
                    let next = r.next_for.as_ref().and_then(|t| {
                        let list = claimed.get_mut(t)?;
                        (!list.is_empty()).then(|| list.remove(0))
                    });
                    let _ = r.reply.send(Ok((ok, next)));
                }
            }
            Err(e) => {
                let msg = format!("{e:#}");
                for r in batch.drain(..) {
                    let _ = r.reply.send(Err(msg.clone()));
                }
            }
        }
    }
}
