//! OpenAI-compatible teacher (vLLM, SGLang, llama.cpp, mistral.rs, Ollama, OpenAI).
//!
//! Every decoding parameter is sent explicitly (temperature 0, top_p 1, seed, max_tokens,
//! stop): servers such as vLLM otherwise fall back to the model's generation_config defaults.
//! Soft labels (`soft_labels.rs`) and re-scoring (`rescore.rs`) extend the same client.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::json;

mod rescore;
mod soft_labels;

use super::retry::{backoff, parse_retry_after, CoolDown};
use super::token_map::TokenMap;
use super::{GenerateOutput, GenerateRequest, Teacher, TeacherError};
use crate::config::{LogprobBase, TeacherSettings, TeacherSpec};
use crate::domain::job::{Endpoint, JobMode, JobParams};
use crate::domain::render::RenderedRequest;

const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// Shared cool-down applied on a 429 without `Retry-After`.
const DEFAULT_429_COOLDOWN: Duration = Duration::from_secs(1);

pub struct OpenAiTeacher {
    name: String,
    identity: String,
    base_url: String,
    model: String,
    api_key: Option<String>,
    client: reqwest::Client,
    timeout: Duration,
    max_retries: u32,
    max_in_flight: usize,
    requests: Option<DefaultDirectRateLimiter>,
    tokens: Option<(DefaultDirectRateLimiter, u32)>,
    cool_down: CoolDown,
    /// Maps returned token texts to ids (servers that do not return ids).
    token_map: Option<std::sync::Arc<TokenMap>>,
    logprob_base: LogprobBase,
    extra_body: serde_json::Map<String, serde_json::Value>,
    /// Whether the server accepts `return_tokens_as_token_ids` (found by the logprobs probe).
    ids_field: std::sync::Mutex<Option<bool>>,
    /// Where an echoed prompt's log-probabilities sit (found by the rescore probe): 0 when
    /// entry i holds the distribution that predicted token i, 1 when it holds the next one's
    /// (llama-cpp-python's echo for models without a BOS token).
    echo_shift: std::sync::Mutex<Option<usize>>,
    probe_lock: tokio::sync::Mutex<()>,
}

impl OpenAiTeacher {
    pub fn new(s: &TeacherSettings) -> anyhow::Result<Self> {
        let TeacherSpec::OpenAi { base_url, model } = &s.spec else {
            anyhow::bail!("not an OpenAI-compatible teacher spec");
        };
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(s.max_in_flight.max(1))
            .connect_timeout(Duration::from_secs(10).min(s.request_timeout))
            .tcp_nodelay(true)
            .build()?;
        // Smooth rather than bursty: requests may burst one second's worth, tokens six seconds'
        // worth (room for one large request), then refill at the per-minute rate.
        let per_minute = |n: u32, burst_div: u32| {
            let rate = NonZeroU32::new(n).expect("validated positive");
            Quota::per_minute(rate).allow_burst(NonZeroU32::new((n / burst_div).max(1)).expect("max(1)"))
        };
        Ok(OpenAiTeacher {
            name: s.name.clone(),
            // Extra request fields change answers: they are part of the cache identity.
            identity: if s.extra_body.is_empty() {
                s.spec.identity()
            } else {
                format!("{}+{}", s.spec.identity(), serde_json::Value::Object(s.extra_body.clone()))
            },
            extra_body: s.extra_body.clone(),
            base_url: base_url.clone(),
            model: model.clone(),
            api_key: s.api_key.clone(),
            client,
            timeout: s.request_timeout,
            max_retries: s.max_retries,
            max_in_flight: s.max_in_flight,
            requests: s.requests_per_minute.map(|n| RateLimiter::direct(per_minute(n, 60))),
            tokens: s.tokens_per_minute.map(|n| (RateLimiter::direct(per_minute(n, 10)), (n / 10).max(1))),
            cool_down: CoolDown::default(),
            token_map: match &s.tokenizer {
                Some(path) => Some(std::sync::Arc::new(TokenMap::load(path).map_err(|e| {
                    anyhow::anyhow!("teacher `{}`: cannot load --teacher-tokenizer {}: {e:#}", s.name, path.display())
                })?)),
                None => None,
            },
            logprob_base: s.logprob_base,
            ids_field: std::sync::Mutex::new(None),
            echo_shift: std::sync::Mutex::new(None),
            probe_lock: tokio::sync::Mutex::new(()),
        })
    }

    fn body(&self, req: &GenerateRequest) -> (String, serde_json::Value) {
        let ids = self.ids_field.lock().expect("ids lock").unwrap_or(false);
        self.body_with(req, ids)
    }

    /// The request body; with `top_k` > 0 it asks for log-probabilities, and with `ids` for
    /// token ids instead of texts (vLLM's `return_tokens_as_token_ids`).
    fn body_with(&self, req: &GenerateRequest, ids: bool) -> (String, serde_json::Value) {
        let mut body = serde_json::Value::Object(self.extra_body.clone());
        let own = json!({
            "model": self.model,
            "temperature": 0.0,
            "top_p": 1.0,
            "n": 1,
            "seed": req.seed,
            "max_tokens": req.max_new_tokens,
            "stop": req.stop,
            "stream": false,
        });
        for (k, v) in own.as_object().expect("an object") {
            body[k] = v.clone();
        }
        let path = match &req.request {
            RenderedRequest::Chat(messages) => {
                body["messages"] = json!(messages);
                if req.top_k > 0 {
                    body["logprobs"] = json!(true);
                    body["top_logprobs"] = json!(req.top_k);
                }
                "chat/completions"
            }
            RenderedRequest::Text(prompt) => {
                body["prompt"] = json!(prompt);
                if req.top_k > 0 {
                    body["logprobs"] = json!(req.top_k);
                }
                "completions"
            }
        };
        if req.top_k > 0 && ids {
            body["return_tokens_as_token_ids"] = json!(true);
        }
        (format!("{}/{path}", self.base_url), body)
    }

    async fn wait_for_limits(&self, req: &GenerateRequest) {
        self.cool_down.wait().await;
        if let Some(l) = &self.requests {
            l.until_ready().await;
        }
        if let Some((l, cap)) = &self.tokens {
            let want = req.request.estimated_tokens().saturating_add(req.max_new_tokens).clamp(1, *cap);
            let _ = l.until_n_ready(NonZeroU32::new(want).expect("clamped to >= 1")).await;
        }
    }

    async fn send_once(&self, url: &str, body: &serde_json::Value, chat: bool) -> Attempt {
        let mut rb = self.client.post(url).timeout(self.timeout).json(body);
        if let Some(key) = &self.api_key {
            rb = rb.bearer_auth(key);
        }
        let started = Instant::now();
        let resp = match rb.send().await {
            Ok(r) => r,
            Err(e) => return Attempt::Retry { message: describe(&e), retry_after: None },
        };
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => return Attempt::Retry { message: describe(&e), retry_after: None },
        };
        let latency = started.elapsed();
        if status == StatusCode::TOO_MANY_REQUESTS {
            self.cool_down.extend(retry_after.unwrap_or(DEFAULT_429_COOLDOWN));
            return Attempt::Retry { message: format!("HTTP 429: {}", excerpt(&bytes)), retry_after };
        }
        if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
            return Attempt::Retry { message: format!("HTTP {}: {}", status.as_u16(), excerpt(&bytes)), retry_after };
        }
        if !status.is_success() {
            return Attempt::Fatal(format!("HTTP {}: {}", status.as_u16(), excerpt(&bytes)));
        }
        match parse_response(&bytes, chat) {
            Ok((mut out, logprobs)) => {
                out.latency = latency;
                Attempt::Done(out, logprobs)
            }
            // A truncated or garbled body from a proxy or an overloaded server: try again.
            Err(e) => Attempt::Retry { message: format!("malformed response: {e}"), retry_after: None },
        }
    }
}

impl OpenAiTeacher {
    /// One request, retried on transient failures with backoff: the answer, its logprobs, and
    /// the number of requests sent.
    async fn send_with_retries(
        &self,
        req: &GenerateRequest,
        url: &str,
        body: &serde_json::Value,
        chat: bool,
    ) -> Result<(GenerateOutput, Option<serde_json::Value>, u32), TeacherError> {
        let mut attempts = 0;
        loop {
            self.wait_for_limits(req).await;
            attempts += 1;
            match self.send_once(url, body, chat).await {
                Attempt::Done(mut out, logprobs) => {
                    out.http_attempts = attempts;
                    return Ok((out, logprobs, attempts));
                }
                Attempt::Fatal(message) => return Err(TeacherError::Fatal { message, attempts }),
                Attempt::Retry { message, retry_after } => {
                    if attempts > self.max_retries {
                        return Err(TeacherError::Transient { message, attempts });
                    }
                    let wait = backoff(attempts, BACKOFF_BASE, BACKOFF_CAP).max(retry_after.unwrap_or_default());
                    tracing::debug!(teacher = %self.name, attempts, ?wait, %message, "retrying teacher request");
                    crate::metrics::global().teacher_retries.get_or_create(&self.label()).inc();
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

enum Attempt {
    /// The answer, and its choice's `logprobs` when the response had them.
    Done(GenerateOutput, Option<serde_json::Value>),
    Retry { message: String, retry_after: Option<Duration> },
    Fatal(String),
}

fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "response body broken"
    } else {
        "request failed"
    };
    let mut msg = format!("{kind}: {e}");
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}

fn excerpt(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]);
    s.replace('\n', " ")
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: Option<i64>,
    completion_tokens: Option<i64>,
}

#[derive(Deserialize)]
struct ChatMessage {
    content: Option<String>,
}

#[derive(Deserialize)]
struct Choice {
    message: Option<ChatMessage>,
    text: Option<String>,
    finish_reason: Option<String>,
    logprobs: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Response {
    model: Option<String>,
    system_fingerprint: Option<String>,
    choices: Vec<Choice>,
    usage: Option<Usage>,
}

fn parse_response(bytes: &[u8], chat: bool) -> Result<(GenerateOutput, Option<serde_json::Value>), String> {
    let r: Response = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let choice = r.choices.into_iter().next().ok_or("no choices in response")?;
    let logprobs = choice.logprobs.filter(|v| !v.is_null());
    let text = if chat {
        choice.message.ok_or("choice has no message")?.content.unwrap_or_default()
    } else {
        choice.text.ok_or("choice has no text")?
    };
    let out = GenerateOutput {
        text,
        finish_reason: choice.finish_reason,
        prompt_tokens: r.usage.as_ref().and_then(|u| u.prompt_tokens),
        completion_tokens: r.usage.as_ref().and_then(|u| u.completion_tokens),
        model: r.model,
        system_fingerprint: r.system_fingerprint,
        latency: Duration::ZERO,
        http_attempts: 0,
        prompt_token_ids: None,
        completion_token_ids: None,
        soft_labels: None,
    };
    Ok((out, logprobs))
}

#[async_trait]
impl Teacher for OpenAiTeacher {
    fn name(&self) -> &str {
        &self.name
    }

    fn identity(&self) -> &str {
        &self.identity
    }

    fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    async fn generate(&self, req: &GenerateRequest) -> Result<GenerateOutput, TeacherError> {
        if let Some(answer) = &req.answer {
            return self.rescore(req, answer).await;
        }
        if req.top_k > 0 && self.ids_field.lock().expect("ids lock").is_none() {
            // A job submitted before this process started: probe once, as its submission did.
            let endpoint = if matches!(req.request, RenderedRequest::Chat(_)) { Endpoint::Chat } else { Endpoint::Completions };
            self.probe(req.top_k, endpoint).await.map_err(|message| TeacherError::Fatal { message, attempts: 1 })?;
        }
        let (url, body) = self.body(req);
        let chat = matches!(req.request, RenderedRequest::Chat(_));
        let (mut out, logprobs, attempts) = self.send_with_retries(req, &url, &body, chat).await?;
        if req.top_k > 0 {
            self.attach_soft_labels(&mut out, logprobs, req, chat).map_err(|message| TeacherError::Fatal { message, attempts })?;
        }
        Ok(out)
    }

    async fn supports(&self, params: &JobParams) -> Result<(), String> {
        if params.mode == JobMode::Rescore {
            return self.probe_echo(params.logprobs).await;
        }
        self.probe(params.logprobs, params.endpoint).await
    }

    fn token_texts(&self, ids: &[u32]) -> Option<Vec<String>> {
        let map = self.token_map.as_ref()?;
        Some(ids.iter().map(|&id| map.text(id)).collect())
    }

    async fn health(&self) -> Result<(), String> {
        let mut rb = self.client.get(format!("{}/models", self.base_url)).timeout(Duration::from_secs(5));
        if let Some(key) = &self.api_key {
            rb = rb.bearer_auth(key);
        }
        match rb.send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("GET /models answered HTTP {}", r.status().as_u16())),
            Err(e) => Err(describe(&e)),
        }
    }
}


impl OpenAiTeacher {
    fn label(&self) -> crate::metrics::TeacherLabel {
        crate::metrics::TeacherLabel { teacher: self.name.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chat_and_completion_bodies() {
        let chat = br#"{"id":"x","model":"m","system_fingerprint":"fp","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
        let (out, _) = parse_response(chat, true).unwrap();
        assert_eq!((out.text.as_str(), out.finish_reason.as_deref(), out.prompt_tokens), ("hi", Some("stop"), Some(3)));
        assert_eq!(out.system_fingerprint.as_deref(), Some("fp"));
        let comp = br#"{"model":"m","choices":[{"text":" 4","finish_reason":"length"}]}"#;
        assert_eq!(parse_response(comp, false).unwrap().0.text, " 4");
        assert!(parse_response(b"{not json", true).is_err());
        assert!(parse_response(br#"{"choices":[]}"#, true).is_err());
    }
}
