//! The queue's own guarantees, driven directly: leases expire and return items, and every
//! write is fenced by (lease owner, attempts), so a worker that lost its lease changes nothing.

use std::time::Duration;

use server::db::Db;
use server::domain::job::{Endpoint, JobParams};
use server::domain::prompt_set::{NewPrompt, NewPromptSet, PromptContent, Source};
use server::queue::{self, Finished, NewCompletion, Outcome};
use server::teacher::GenerateOutput;

async fn setup(n: usize) -> (tempfile::TempDir, Db, i64) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("q.sqlite")).await.unwrap();
    let prompts = (0..n)
        .map(|i| NewPrompt { external_id: None, content: PromptContent::Text(format!("p{i}")), system: None, metadata: None })
        .collect();
    let (set, _) = server::store::prompt_sets::insert(&db, NewPromptSet { name: "q".into(), source: Source::Json, prompts })
        .await
        .unwrap();
    let params = JobParams { endpoint: Endpoint::Chat, max_new_tokens: 8, template: None, system: None, stop: vec![], seed: 0, logprobs: 0, mode: Default::default() };
    let rows = server::store::prompt_sets::prompts(&db, set, -1, 1000).await.unwrap();
    let items: Vec<(i64, String)> = rows.iter().map(|r| (r.id, format!("key-{}", r.id))).collect();
    let job = server::store::jobs::insert(&db, set, "ghost", "openai:http://ghost/v1#m", &params, &items).await.unwrap();
    (dir, db, job)
}

fn answer(item: &queue::Claimed, text: &str) -> Finished {
    let output = GenerateOutput { text: text.into(), finish_reason: Some("stop".into()), completion_tokens: Some(2), ..Default::default() };
    Finished {
        item: item.clone(),
        outcome: Outcome::Fresh(NewCompletion {
            teacher_identity: "openai:http://ghost/v1#m".into(),
            endpoint: Endpoint::Chat,
            request: "[]".into(),
            output,
            soft_labels: None,
        }),
    }
}

async fn status_of(db: &Db, id: i64) -> (String, i64, Option<String>) {
    sqlx::query_as("SELECT status, attempts, lease_owner FROM generations WHERE id = ?")
        .bind(id)
        .fetch_one(&db.reader)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_expired_lease_returns_the_item_and_fences_out_the_old_owner() {
    let (_dir, db, job) = setup(3).await;
    let short = Duration::from_millis(50);
    let a = queue::claim(&db.writer, "ghost", "owner-a", 1, short).await.unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].attempts, 1);
    assert_eq!(a[0].job_id, job);
    assert!(queue::claim(&db.writer, "other-teacher", "owner-a", 5, short).await.unwrap().is_empty());

    tokio::time::sleep(Duration::from_millis(80)).await;
    assert_eq!(queue::requeue_expired(&db, 3).await.unwrap(), 1);
    assert_eq!(status_of(&db, a[0].id).await, ("queued".into(), 1, None));

    let b = queue::claim(&db.writer, "ghost", "owner-b", 1, Duration::from_secs(60)).await.unwrap();
    assert_eq!((b[0].id, b[0].attempts), (a[0].id, 2));

    // The old owner's late writes change nothing...
    let (applied, _) = queue::complete_batch(&db, "owner-a", &[answer(&a[0], "late")], &[], short).await.unwrap();
    assert_eq!(applied, vec![false]);
    assert!(!queue::fail(&db, &a[0], "owner-a", "boom", None, 3).await.unwrap());
    assert_eq!(queue::heartbeat(&db, "owner-a", short).await.unwrap(), 0);
    assert_eq!(status_of(&db, b[0].id).await, ("running".into(), 2, Some("owner-b".into())));
    // ...and the new owner's write lands. (The late answer still filled the cache.)
    let (applied, claimed) =
        queue::complete_batch(&db, "owner-b", &[answer(&b[0], "fresh")], &[("ghost".into(), 5)], short).await.unwrap();
    assert_eq!(applied, vec![true]);
    assert_eq!(claimed["ghost"].len(), 2, "the same transaction claims the next items");
    assert_eq!(status_of(&db, b[0].id).await, ("done".into(), 2, None));
    let (n, tokens): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM completions), completion_tokens FROM jobs WHERE id = ?")
            .bind(job)
            .fetch_one(&db.reader)
            .await
            .unwrap();
    assert_eq!((n, tokens), (1, 2), "one cached answer; the job counts the done item once");
}

#[tokio::test]
async fn leases_renewed_by_heartbeat_do_not_expire_and_attempts_run_out() {
    let (_dir, db, _job) = setup(1).await;
    let lease = Duration::from_millis(120);
    let a = queue::claim(&db.writer, "ghost", "owner-a", 1, lease).await.unwrap();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(queue::heartbeat(&db, "owner-a", lease).await.unwrap(), 1);
        assert_eq!(queue::requeue_expired(&db, 3).await.unwrap(), 0);
    }
    // With attempts used up, an expired lease fails the item instead of requeueing it.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(queue::requeue_expired(&db, 1).await.unwrap(), 1);
    let (status, _, _) = status_of(&db, a[0].id).await;
    assert_eq!(status, "failed");
    assert!(queue::claim(&db.writer, "ghost", "owner-b", 1, lease).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_failed_attempt_waits_for_its_backoff_before_it_is_claimable() {
    let (_dir, db, _job) = setup(1).await;
    let a = queue::claim(&db.writer, "ghost", "w", 1, Duration::from_secs(60)).await.unwrap();
    let retry_at = server::time::now_ms() + 150;
    assert!(queue::fail(&db, &a[0], "w", "HTTP 503", Some(retry_at), 3).await.unwrap());
    assert!(queue::claim(&db.writer, "ghost", "w", 1, Duration::from_secs(60)).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = queue::claim(&db.writer, "ghost", "w", 1, Duration::from_secs(60)).await.unwrap();
    assert_eq!(again[0].attempts, 2);
}
