//! A mock OpenAI-compatible server (`/v1/chat/completions`, `/v1/completions`, `/v1/models`)
//! with scripted faults: 429 + Retry-After, 500, hang, connection reset, malformed JSON, slow.
//! Its answer to a prompt is deterministic (`echo: <last user text>`), like greedy decoding.
//! With `logprobs` it behaves like vLLM: one token per word, ids when asked for
//! (`return_tokens_as_token_ids`), at most 20 alternatives, natural logs (or base 10, like
//! mistral.rs, when told to); see [`mock_logprobs`].

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

/// A fault to apply to one request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// 429 with an optional `Retry-After` header value.
    TooMany { retry_after: Option<String> },
    /// HTTP 500.
    ServerError,
    /// HTTP 400 (not retryable).
    BadRequest,
    /// Never answers (the client's timeout must fire).
    Hang,
    /// Drops the connection without a response.
    Reset,
    /// 200 with a body that is not JSON.
    Malformed,
    /// Answers correctly after this delay.
    Slow(Duration),
}

#[derive(Default)]
pub struct MockState {
    latency: Mutex<Duration>,
    script: Mutex<VecDeque<Fault>>,
    sticky: Mutex<Option<Fault>>,
    /// Requests answered successfully, per prompt text.
    answered: Mutex<HashMap<String, u32>>,
    /// Every request body received, with its arrival time.
    received: Mutex<Vec<(Instant, Value)>>,
    total: AtomicU64,
    record_bodies: std::sync::atomic::AtomicBool,
    /// Report log-probabilities in base 10 (mistral.rs's server does).
    pub base10: std::sync::atomic::AtomicBool,
}

/// A running mock teacher.
pub struct MockOpenAi {
    /// Base URL including `/v1`.
    pub url: String,
    pub state: Arc<MockState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockOpenAi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockOpenAi {
    pub async fn start() -> Self {
        let state = Arc::new(MockState::default());
        state.record_bodies.store(true, Ordering::Relaxed);
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .route("/v1/models", get(models))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        MockOpenAi { url: format!("http://{addr}/v1"), state, task }
    }

    /// Teacher spec for `--teacher NAME=SPEC`.
    pub fn spec(&self) -> String {
        format!("openai:{}#mock-model", self.url)
    }

    /// Delay before every answer.
    pub fn set_latency(&self, d: Duration) {
        *self.state.latency.lock().unwrap() = d;
    }

    /// Faults for the next requests, one each, in order.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state.script.lock().unwrap().extend(faults);
    }

    /// A fault applied to every request until cleared.
    pub fn set_sticky(&self, fault: Option<Fault>) {
        *self.state.sticky.lock().unwrap() = fault;
    }

    /// Stop recording request bodies (benchmarks).
    pub fn record_bodies(&self, on: bool) {
        self.state.record_bodies.store(on, Ordering::Relaxed);
    }

    /// Successful answers per prompt text.
    pub fn answered(&self) -> HashMap<String, u32> {
        self.state.answered.lock().unwrap().clone()
    }

    /// Requests received (including faulted ones).
    pub fn total_requests(&self) -> u64 {
        self.state.total.load(Ordering::Relaxed)
    }

    pub fn received(&self) -> Vec<(Instant, Value)> {
        self.state.received.lock().unwrap().clone()
    }

    /// The answer the mock gives to a prompt.
    pub fn answer_for(prompt: &str) -> String {
        format!("echo: {prompt}")
    }
}

async fn models() -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": "mock-model", "object": "model"}]}))
}

/// The prompt text a request carries: last message content, or the raw prompt.
fn prompt_of(body: &Value) -> String {
    if let Some(msgs) = body["messages"].as_array() {
        msgs.last().and_then(|m| m["content"].as_str()).unwrap_or("").to_string()
    } else {
        body["prompt"].as_str().unwrap_or("").to_string()
    }
}

async fn handle(state: Arc<MockState>, headers: HeaderMap, body: Value, chat: bool) -> Response {
    let _ = headers;
    state.total.fetch_add(1, Ordering::Relaxed);
    if state.record_bodies.load(Ordering::Relaxed) {
        state.received.lock().unwrap().push((Instant::now(), body.clone()));
    }
    let fault = {
        let next = state.script.lock().unwrap().pop_front();
        next.or_else(|| state.sticky.lock().unwrap().clone())
    };
    let latency = *state.latency.lock().unwrap();
    match fault {
        Some(Fault::TooMany { retry_after }) => {
            let mut resp = (StatusCode::TOO_MANY_REQUESTS, Json(json!({"error": {"message": "rate limited"}}))).into_response();
            if let Some(v) = retry_after {
                resp.headers_mut().insert("retry-after", v.parse().unwrap());
            }
            return resp;
        }
        Some(Fault::ServerError) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "upstream exploded").into_response();
        }
        Some(Fault::BadRequest) => {
            return (StatusCode::BAD_REQUEST, Json(json!({"error": {"message": "prompt too long"}}))).into_response();
        }
        Some(Fault::Hang) => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Some(Fault::Reset) => {
            // Unwinding without the panic hook aborts this connection's task: the socket is
            // dropped with no response written.
            std::panic::resume_unwind(Box::new("simulated connection reset"));
        }
        Some(Fault::Malformed) => {
            return (StatusCode::OK, [("content-type", "application/json")], "{\"choices\": [").into_response();
        }
        Some(Fault::Slow(d)) => tokio::time::sleep(d).await,
        None => {}
    }
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let prompt = prompt_of(&body);
    let text = MockOpenAi::answer_for(&prompt);
    *state.answered.lock().unwrap().entry(prompt.clone()).or_default() += 1;
    let prompt_tokens = prompt.split_whitespace().count() as i64 + 1;
    let completion_tokens = text.split_whitespace().count() as i64;
    let model = body["model"].as_str().unwrap_or("mock-model");
    let k = if chat {
        body["logprobs"].as_bool().unwrap_or(false).then(|| body["top_logprobs"].as_u64().unwrap_or(0))
    } else {
        body["logprobs"].as_u64()
    };
    if k.is_some_and(|k| k > 20) {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": {"message": "top_logprobs must be <= 20 (see --max-logprobs)"}})))
            .into_response();
    }
    let ids = body["return_tokens_as_token_ids"].as_bool().unwrap_or(false);
    let base10 = state.base10.load(Ordering::Relaxed);
    let mut choice = if chat {
        json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"})
    } else {
        json!({"index": 0, "text": text, "finish_reason": "stop"})
    };
    if let Some(k) = k {
        choice["logprobs"] = mock_logprobs(&text, k as usize, ids, base10, chat);
    }
    Json(json!({
        "id": "cmpl-mock",
        "object": if chat { "chat.completion" } else { "text_completion" },
        "model": model,
        "system_fingerprint": "fp_mock",
        "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                   "total_tokens": prompt_tokens + completion_tokens}
    }))
    .into_response()
}

/// The mock's id of a word: stable, in 10..1010.
pub fn mock_token_id(word: &str) -> u32 {
    10 + word.bytes().fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32)) % 1000
}

/// The mock's natural log-probabilities at every token: the emitted token −0.5, then
/// alternatives (ids 2000 + position·50 + j) at −2, −3, ... (their mass stays below 1).
pub fn mock_natural_logprobs(k: usize) -> Vec<f64> {
    std::iter::once(-0.5).chain((1..k).map(|j| -1.0 - j as f64)).collect()
}

/// `logprobs` of a response in OpenAI's layout (chat or completions) for the words of `text`.
fn mock_logprobs(text: &str, k: usize, ids: bool, base10: bool, chat: bool) -> Value {
    let scale = if base10 { std::f64::consts::LN_10 } else { 1.0 };
    let lps: Vec<f64> = mock_natural_logprobs(k.max(1)).into_iter().map(|v| v / scale).collect();
    let name = |id: u32, word: &str| if ids { format!("token_id:{id}") } else { word.to_string() };
    let words: Vec<&str> = text.split_whitespace().collect();
    let per_token: Vec<(String, f64, Vec<(String, f64)>)> = words
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let chosen = name(mock_token_id(w), w);
            let mut top = vec![(chosen.clone(), lps[0])];
            for j in 1..k {
                let id = 2000 + i as u32 * 50 + j as u32;
                top.push((name(id, &format!("alt{id}")), lps[j]));
            }
            (chosen, lps[0], top)
        })
        .collect();
    if chat {
        json!({"content": per_token.iter().map(|(t, lp, top)| json!({
            "token": t, "logprob": lp,
            "top_logprobs": top.iter().map(|(a, b)| json!({"token": a, "logprob": b})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>()})
    } else {
        json!({
            "tokens": per_token.iter().map(|p| p.0.clone()).collect::<Vec<_>>(),
            "token_logprobs": per_token.iter().map(|p| p.1).collect::<Vec<_>>(),
            "top_logprobs": per_token.iter().map(|p| p.2.iter().map(|(a, b)| (a.clone(), json!(b))).collect::<serde_json::Map<String, Value>>())
                .collect::<Vec<_>>(),
        })
    }
}

async fn chat(State(s): State<Arc<MockState>>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    handle(s, headers, body, true).await
}

async fn completions(State(s): State<Arc<MockState>>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    handle(s, headers, body, false).await
}
