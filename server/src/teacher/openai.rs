//! OpenAI-compatible teacher (vLLM, SGLang, llama.cpp, mistral.rs, Ollama, OpenAI).
//!
//! Every decoding parameter is sent explicitly (temperature 0, top_p 1, seed, max_tokens,
//! stop): servers such as vLLM otherwise fall back to the model's generation_config defaults.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::retry::{backoff, parse_retry_after, CoolDown};
use super::server_logprobs::{self, ServerToken};
use super::token_map::{parse_token_id, TokenMap};
use super::{GenerateOutput, GenerateRequest, Teacher, TeacherError};
use crate::config::{LogprobBase, TeacherSettings, TeacherSpec};
use crate::domain::job::{Endpoint, JobMode, JobParams};
use crate::domain::prompt_set::Message;
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
        let mut attempts = 0;
        loop {
            self.wait_for_limits(req).await;
            attempts += 1;
            match self.send_once(&url, &body, chat).await {
                Attempt::Done(mut out, logprobs) => {
                    out.http_attempts = attempts;
                    if req.top_k > 0 {
                        self.attach_soft_labels(&mut out, logprobs, req, chat)
                            .map_err(|message| TeacherError::Fatal { message, attempts })?;
                    }
                    return Ok(out);
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

    async fn supports(&self, params: &JobParams) -> Result<(), String> {
        if params.mode == JobMode::Rescore {
            return self.probe_echo(params.logprobs).await;
        }
        self.probe(params.logprobs, params.endpoint).await
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

    /// Asks the server for a short answer with `k` log-probabilities per token and checks what
    /// comes back: that it honours k, gives ids (or texts the teacher's tokenizer maps), and
    /// that its values are natural logs (or the configured base). Remembers whether the server
    /// takes `return_tokens_as_token_ids`.
    async fn probe(&self, k: u32, endpoint: Endpoint) -> Result<(), String> {
        let _one_at_a_time = self.probe_lock.lock().await;
        let request = match endpoint {
            Endpoint::Chat => RenderedRequest::Chat(vec![Message { role: "user".into(), content: "Name a colour.".into() }]),
            Endpoint::Completions => RenderedRequest::Text("The colour of the sky is".into()),
        };
        let req = GenerateRequest { request, max_new_tokens: 2, stop: vec![], seed: 0, top_k: k, answer: None };
        let chat = endpoint == Endpoint::Chat;
        let mut refused = String::new();
        for ids in [true, false] {
            let (url, body) = self.body_with(&req, ids);
            let logprobs = match self.send_once(&url, &body, chat).await {
                Attempt::Done(_, logprobs) => logprobs,
                // Some servers refuse fields they do not know: try once without the ids field.
                Attempt::Fatal(msg) => {
                    refused = msg;
                    continue;
                }
                Attempt::Retry { message, .. } => {
                    return Err(format!("teacher `{}` did not answer the logprobs probe: {message}", self.name))
                }
            };
            let logprobs = logprobs.ok_or_else(|| {
                format!("teacher `{}` returned no log-probabilities: its server does not support logprobs", self.name)
            })?;
            let tokens = server_logprobs::parse(&logprobs, chat)
                .map_err(|e| format!("teacher `{}` returned log-probabilities this server cannot read: {e}", self.name))?;
            self.check_probe(&tokens, k)?;
            *self.ids_field.lock().expect("ids lock") = Some(ids);
            return Ok(());
        }
        Err(format!("teacher `{}` refused a request for logprobs = {k}: {refused}", self.name))
    }

    fn check_probe(&self, tokens: &[ServerToken], k: u32) -> Result<(), String> {
        let first = tokens.first().ok_or_else(|| format!("teacher `{}` returned no tokens to the logprobs probe", self.name))?;
        let mut distinct: Vec<&str> = first.top.iter().map(|t| t.0.as_str()).collect();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() < k as usize {
            return Err(format!(
                "teacher `{}` was asked for the top {k} log-probabilities and returned {} (vLLM allows at most 20 unless \
                 started with --max-logprobs); lower the job's logprobs or raise the server's limit",
                self.name,
                distinct.len()
            ));
        }
        if parse_token_id(&first.token).is_none() && self.token_map.is_none() {
            return Err(format!(
                "teacher `{}` returns token texts, not ids; give its tokenizer with --teacher-tokenizer {}=PATH \
                 (GGUF, tokenizer.json or a folder) so that they can be mapped and checked",
                self.name, self.name
            ));
        }
        let f = self.logprob_base.to_natural();
        let mass: f64 = first.top.iter().map(|t| (t.1 * f).exp()).sum();
        if mass > 1.0 + 1e-3 {
            return Err(format!(
                "teacher `{}`: the top-{k} probabilities sum to {mass:.3} > 1 read as {}; its server reports another \
                 base (mistral.rs uses base 10): set --logprob-base {}=10",
                self.name,
                if self.logprob_base == LogprobBase::E { "natural logs" } else { "base-10 logs" },
                self.name
            ));
        }
        Ok(())
    }

    /// A completions request for `prompt` (text), one new token, `k` log-probabilities, and
    /// with `echo` the prompt's own.
    fn echo_body(&self, prompt: &str, k: u32, echo: bool) -> (String, serde_json::Value) {
        let req = GenerateRequest {
            request: RenderedRequest::Text(prompt.to_string()),
            max_new_tokens: 1,
            stop: vec![],
            seed: 0,
            top_k: k,
            answer: None,
        };
        let (url, mut body) = self.body_with(&req, self.ids_field.lock().expect("ids lock").unwrap_or(false));
        if echo {
            body["echo"] = json!(true);
        }
        (url, body)
    }

    async fn echo_tokens(&self, prompt: &str, k: u32, echo: bool) -> Result<Vec<ServerToken>, String> {
        let (url, body) = self.echo_body(prompt, k, echo);
        match self.send_once(&url, &body, false).await {
            Attempt::Done(_, Some(lp)) => server_logprobs::parse(&lp, false),
            Attempt::Done(_, None) => Err("the server returned no log-probabilities".into()),
            Attempt::Fatal(m) | Attempt::Retry { message: m, .. } => Err(m),
        }
    }

    /// Re-scoring on an OpenAI-compatible server: the completions endpoint with `echo` and
    /// `logprobs` over the conversation rendered by the teacher's own template. The probe
    /// compares the echoed log-probability of a token with the one the server gives when it
    /// generates that token, which tells where the echoed values sit (or refuses).
    async fn probe_echo(&self, k: u32) -> Result<(), String> {
        let name = &self.name;
        let map = self.token_map.as_deref().filter(|m| m.can_render()).ok_or_else(|| {
            format!(
                "teacher `{name}`: a rescore job renders each conversation with the model's chat template; give the \
                 model's GGUF with --teacher-tokenizer {name}=PATH"
            )
        })?;
        self.probe(k, Endpoint::Completions).await?;
        let _one_at_a_time = self.probe_lock.lock().await;
        let messages = vec![Message { role: "user".into(), content: "Name a colour.".into() }];
        let r = map.render_answer(&messages, "").expect("checked").map_err(|e| format!("{e:#}"))?;
        let prompt = r.text.strip_suffix(&map.decode(&r.answer_ids)).unwrap_or(&r.text).to_string();
        let why = |e: String| format!("teacher `{name}` cannot re-score: its server refused echo with logprobs: {e}");
        let first = self.echo_tokens(&prompt, k, false).await.map_err(why)?;
        let t0 = first.first().ok_or_else(|| why("no token generated".into()))?;
        let l0 = t0.logprob.ok_or_else(|| why("no log-probability".into()))?;
        let id = |t: &str| parse_token_id(t).or_else(|| map.id(t).ok());
        let t0_id = id(&t0.token).ok_or_else(|| why(format!("cannot vouch for the id of {:?}", t0.token)))?;
        let echoed = self.echo_tokens(&format!("{prompt}{}", map.decode(&[t0_id])), k, true).await.map_err(why)?;
        let e = (0..echoed.len()).rev().take(2).find(|&i| id(&echoed[i].token) == Some(t0_id)).ok_or_else(|| {
            why(format!("the echoed prompt does not end with the token {:?} it was given", t0.token))
        })?;
        let close = |v: f64| (v - l0).abs() <= 0.05_f64.max(0.02 * l0.abs());
        let shift = if echoed[e].logprob.is_some_and(close) {
            0
        } else if e > 0 && echoed[e - 1].top.iter().any(|(t, v)| id(t) == Some(t0_id) && close(*v)) {
            1
        } else {
            return Err(format!(
                "teacher `{name}` cannot re-score: the log-probability its server echoes for a token matches neither \
                 the one it gives when generating that token ({l0}) nor the entry before it"
            ));
        };
        tracing::info!(teacher = %name, shift, "echoed log-probabilities located");
        *self.echo_shift.lock().expect("shift lock") = Some(shift);
        Ok(())
    }

    /// Scores a given answer: one completions request echoing the rendered conversation. Every
    /// echoed token must map to the id we rendered (the server tokenized it as we did).
    async fn rescore(&self, req: &GenerateRequest, answer: &str) -> Result<GenerateOutput, TeacherError> {
        let fatal = |message: String| TeacherError::Fatal { message, attempts: 1 };
        if self.echo_shift.lock().expect("shift lock").is_none() {
            self.probe_echo(req.top_k).await.map_err(fatal)?;
        }
        let shift = self.echo_shift.lock().expect("shift lock").unwrap_or(0);
        let map = self.token_map.as_deref().ok_or_else(|| fatal("no --teacher-tokenizer".into()))?;
        let RenderedRequest::Chat(messages) = &req.request else {
            return Err(fatal("a rescore request is a conversation".into()));
        };
        let r = map.render_answer(messages, answer).expect("probed").map_err(|e| fatal(format!("{e:#}")))?;
        let started = Instant::now();
        let mut attempts = 0;
        let echoed = loop {
            self.wait_for_limits(req).await;
            attempts += 1;
            let (url, body) = self.echo_body(&r.text, req.top_k, true);
            match self.send_once(&url, &body, false).await {
                Attempt::Done(_, lp) => {
                    let lp = lp.ok_or_else(|| fatal("the server returned no log-probabilities".into()))?;
                    break server_logprobs::parse(&lp, false).map_err(fatal)?;
                }
                Attempt::Fatal(message) => return Err(TeacherError::Fatal { message, attempts }),
                Attempt::Retry { message, retry_after } => {
                    if attempts > self.max_retries {
                        return Err(TeacherError::Transient { message, attempts });
                    }
                    tokio::time::sleep(backoff(attempts, BACKOFF_BASE, BACKOFF_CAP).max(retry_after.unwrap_or_default())).await;
                }
            }
        };
        let sent: Vec<u32> = r.prompt_ids.iter().chain(&r.answer_ids).copied().collect();
        // An echoed token is the one sent when it maps to its id, or when it is "" for a special
        // token (llama.cpp gives special tokens no text).
        let same = |t: &ServerToken, sent: u32| {
            parse_token_id(&t.token).or_else(|| map.id(&t.token).ok()) == Some(sent) || (t.token.is_empty() && map.is_special(sent))
        };
        // Which sent token each echoed entry is: all of them, or all but those with the BOS id
        // (llama-cpp-python leaves every one of those out of its echo).
        let all: Vec<usize> = (0..sent.len()).collect();
        let without_bos: Vec<usize> = (0..sent.len()).filter(|&i| Some(sent[i]) != map.bos()).collect();
        let first_mismatch = |at: &[usize]| (0..at.len()).find(|&e| echoed.get(e).is_none_or(|t| !same(t, sent[at[e]])));
        let Some(at) = [all, without_bos].into_iter().find(|at| first_mismatch(at).is_none()) else {
            let i = first_mismatch(&(0..sent.len()).collect::<Vec<_>>()).unwrap_or(0);
            return Err(fatal(format!(
                "the server's echo of the conversation is not the token ids the teacher's tokenizer gives it (token {i}: \
                 the server has {:?}, we rendered id {}); is --teacher-tokenizer the server's model?",
                echoed.get(i).map(|t| t.token.as_str()).unwrap_or("nothing"),
                sent[i]
            )));
        };
        let entry = |sent_index: usize| at.iter().position(|&q| q == sent_index).map(|e| &echoed[e]);
        let mut tokens = Vec::with_capacity(r.answer_ids.len());
        for (j, &aid) in r.answer_ids.iter().enumerate() {
            let a = r.prompt_ids.len() + j;
            // shift 0: the token's own entry holds the distribution that predicted it; shift 1:
            // the previous token's entry does.
            let holder = entry(a - shift).ok_or_else(|| fatal(format!("the server's echo has no entry for answer token {j}")))?;
            let top = holder.top.clone();
            let chosen = if shift == 0 {
                holder.logprob
            } else {
                top.iter().find(|t| parse_token_id(&t.0).or_else(|| map.id(&t.0).ok()) == Some(aid)).map(|t| t.1)
            };
            if chosen.is_none() {
                return Err(fatal(format!(
                    "answer token {j} is not among the server's top {} at its position, and this server echoes no \
                     value for it there; raise the job's logprobs",
                    req.top_k
                )));
            }
            tokens.push(ServerToken { token: format!("token_id:{aid}"), logprob: chosen, top });
        }
        let (ids, positions, _) =
            server_logprobs::to_soft_labels(&tokens, req.top_k as usize, self.logprob_base, Some(map), false).map_err(fatal)?;
        Ok(GenerateOutput {
            text: answer.to_string(),
            finish_reason: Some("stop".into()),
            prompt_tokens: Some(r.prompt_ids.len() as i64),
            completion_tokens: Some(ids.len() as i64),
            model: Some(self.model.clone()),
            system_fingerprint: None,
            latency: started.elapsed(),
            http_attempts: attempts,
            prompt_token_ids: Some(r.prompt_ids),
            completion_token_ids: Some(ids),
            soft_labels: Some(positions),
        })
    }

    /// Turns a response's logprobs into the answer's ids and soft labels, checking that the ids
    /// spell the answer when a tokenizer can tell.
    fn attach_soft_labels(
        &self,
        out: &mut GenerateOutput,
        logprobs: Option<serde_json::Value>,
        req: &GenerateRequest,
        chat: bool,
    ) -> Result<(), String> {
        let logprobs = logprobs.ok_or("the server returned no log-probabilities for this answer")?;
        let tokens = server_logprobs::parse(&logprobs, chat)?;
        let (ids, positions, dropped) =
            server_logprobs::to_soft_labels(&tokens, req.top_k as usize, self.logprob_base, self.token_map.as_deref(), true)?;
        if dropped > 0 {
            tracing::debug!(teacher = %self.name, dropped, "left out alternatives whose ids the tokenizer cannot vouch for");
        }
        if let Some(map) = &self.token_map {
            let spelled = map.decode(&ids);
            let (a, b) = (spelled.trim_start(), out.text.trim_start());
            let ok = a == b || (!req.stop.is_empty() && a.starts_with(b));
            if !ok {
                return Err(format!(
                    "the answer's token ids, mapped through the teacher's tokenizer, spell {:?}, not the answer {:?}; \
                     is --teacher-tokenizer the server's model?",
                    excerpt(spelled.as_bytes()),
                    excerpt(out.text.as_bytes())
                ));
            }
        }
        out.completion_token_ids = Some(ids);
        out.soft_labels = Some(positions);
        Ok(())
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
