//! The OpenAI client against a teacher that misbehaves: every prompt still gets exactly one
//! recorded answer, retries are counted, non-retryable errors fail the item with the reason.

use std::time::{Duration, Instant};

use distill_tests::harness::{with_mock, TestApp};
use distill_tests::mock_openai::{Fault, MockOpenAi};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

#[tokio::test]
async fn transient_faults_are_retried_until_every_prompt_is_answered() {
    let mock = MockOpenAi::start().await;
    mock.push_faults([
        Fault::ServerError,
        Fault::Reset,
        Fault::Malformed,
        Fault::Hang,
        Fault::TooMany { retry_after: Some("0".into()) },
        Fault::Slow(Duration::from_millis(300)),
        Fault::ServerError,
        Fault::Reset,
    ]);
    let t = TestApp::start_with(|s| {
        with_mock(s, &mock);
        s.teachers[0].request_timeout = Duration::from_millis(800);
    })
    .await;
    let prompts: Vec<String> = (0..20).map(|i| format!("prompt {i}")).collect();
    let set = t.prompt_set("f", &prompts).await;
    let job = t.job(json!({"prompt_set": set, "teacher": "mock"})).await;
    let v = t.wait_done(job, T).await;
    assert_eq!(v["counts"]["done"], 20, "{v}");
    let gens = t.all_generations(job, None).await;
    let retried: i64 = gens.iter().map(|g| g["http_attempts"].as_i64().unwrap() - 1).sum();
    assert_eq!(retried, 7, "seven faults needed a retry (the slow one did not)");
    // Each prompt answered exactly once by the teacher, and recorded once.
    let answered = mock.answered();
    for p in &prompts {
        assert_eq!(answered.get(p), Some(&1), "{p}");
    }
    for g in &gens {
        assert_eq!(g["text"], MockOpenAi::answer_for(g["prompt"].as_str().unwrap()));
    }
    t.shutdown().await;
}

#[tokio::test]
async fn retry_after_sets_a_shared_cool_down() {
    let mock = MockOpenAi::start().await;
    mock.push_faults([Fault::TooMany { retry_after: Some("2".into()) }]);
    let t = TestApp::start(&mock).await;
    // One request first, so the 429 hits while the others wait for a slot.
    let set = t.prompt_set("r", &(0..6).map(|i| format!("r{i}")).collect::<Vec<_>>()).await;
    let started = Instant::now();
    let job = t.job(json!({"prompt_set": set, "teacher": "mock"})).await;
    t.wait_done(job, T).await;
    let received = mock.received();
    let first_429 = received[0].0;
    // Requests that arrived after the 429 came no sooner than Retry-After, except those sent
    // before the 429 was seen (all of the first batch).
    let batch = received.iter().filter(|(at, _)| at.duration_since(first_429) < Duration::from_millis(500)).count();
    let later: Vec<Duration> = received.iter().skip(batch).map(|(at, _)| at.duration_since(first_429)).collect();
    assert!(!later.is_empty());
    for d in &later {
        assert!(*d >= Duration::from_millis(1900), "a request came {d:?} after the 429");
    }
    assert!(started.elapsed() >= Duration::from_secs(2));
    t.shutdown().await;
}

#[tokio::test]
async fn fatal_errors_fail_the_item_with_its_reason_and_retry_failed_requeues() {
    let mock = MockOpenAi::start().await;
    mock.set_sticky(Some(Fault::BadRequest));
    let t = TestApp::start(&mock).await;
    let set = t.prompt_set("b", &["a".to_string(), "b".to_string()]).await;
    let job = t.job(json!({"prompt_set": set, "teacher": "mock"})).await;
    let v = t.wait_done(job, T).await;
    assert_eq!(v["counts"]["failed"], 2, "{v}");
    assert_eq!(mock.total_requests(), 2, "a 400 is not retried");
    let failed = t.all_generations(job, Some("failed")).await;
    assert!(failed[0]["last_error"].as_str().unwrap().contains("HTTP 400"), "{}", failed[0]);
    mock.set_sticky(None);
    let (st, v) = t.post(&format!("/v1/jobs/{job}/retry-failed")).await;
    assert_eq!(st, 200, "{v}");
    let v = t.wait_done(job, T).await;
    assert_eq!(v["counts"]["done"], 2, "{v}");
    assert_eq!(v["counts"]["failed"], 0);
    t.shutdown().await;
}

#[tokio::test]
async fn exhausted_retries_requeue_then_fail_after_max_attempts() {
    let mock = MockOpenAi::start().await;
    mock.set_sticky(Some(Fault::ServerError));
    let t = TestApp::start_with(|s| {
        with_mock(s, &mock);
        s.teachers[0].max_retries = 1;
        s.max_attempts = 1;
    })
    .await;
    let set = t.prompt_set("x", &["x".to_string()]).await;
    let job = t.job(json!({"prompt_set": set, "teacher": "mock"})).await;
    let v = t.wait_done(job, T).await;
    assert_eq!(v["counts"]["failed"], 1, "{v}");
    assert_eq!(mock.total_requests(), 2, "one try plus one retry");
    let g = &t.all_generations(job, None).await[0];
    assert!(g["last_error"].as_str().unwrap().contains("HTTP 500"), "{g}");
    assert!(g["last_error"].as_str().unwrap().contains("after 2 attempts"), "{g}");
    t.shutdown().await;
}

#[tokio::test]
async fn in_flight_requests_never_exceed_the_limit() {
    let mock = MockOpenAi::start().await;
    mock.set_latency(Duration::from_millis(50));
    let t = TestApp::start_with(|s| {
        with_mock(s, &mock);
        s.teachers[0].max_in_flight = 3;
    })
    .await;
    let set = t.prompt_set("c", &(0..30).map(|i| format!("c{i}")).collect::<Vec<_>>()).await;
    let job = t.job(json!({"prompt_set": set, "teacher": "mock"})).await;
    let mut max_running = 0;
    loop {
        let (_, v) = t.get(&format!("/v1/jobs/{job}")).await;
        max_running = max_running.max(v["counts"]["running"].as_i64().unwrap());
        if v["status"] == "done" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(max_running <= 3 && max_running >= 2, "{max_running}");
    t.shutdown().await;
}

async fn elapsed_for_job(t: &TestApp, n: usize) -> Duration {
    let set = t.prompt_set("rl", &(0..n).map(|i| format!("rate {i}")).collect::<Vec<_>>()).await;
    let start = Instant::now();
    let job = t.job(json!({"prompt_set": set, "teacher": "mock", "max_new_tokens": 10})).await;
    t.wait_done(job, T).await;
    start.elapsed()
}

#[tokio::test]
async fn requests_per_minute_limit_spaces_requests() {
    let mock = MockOpenAi::start().await;
    let t = TestApp::start_with(|s| {
        with_mock(s, &mock);
        s.teachers[0].requests_per_minute = Some(600); // 10/s, burst 10
    })
    .await;
    let took = elapsed_for_job(&t, 30).await;
    assert!(took >= Duration::from_millis(1800), "30 requests at 10/s took only {took:?}");
    let received = mock.received();
    let span = received.last().unwrap().0.duration_since(received[9].0);
    assert!(span >= Duration::from_millis(1800), "after the burst, 20 requests took {span:?}");
    t.shutdown().await;
}

#[tokio::test]
async fn tokens_per_minute_limit_counts_prompt_and_max_new_tokens() {
    let mock = MockOpenAi::start().await;
    // Each request costs about 10 + 3 tokens; 3000/min = 50/s with a burst of 300.
    let t = TestApp::start_with(|s| {
        with_mock(s, &mock);
        s.teachers[0].tokens_per_minute = Some(3000);
    })
    .await;
    let took = elapsed_for_job(&t, 40).await;
    // 40 * 13 = 520 tokens, 300 in the burst, 220 more at 50/s: at least ~4 s.
    assert!(took >= Duration::from_millis(3500), "took only {took:?}");
    t.shutdown().await;
}
