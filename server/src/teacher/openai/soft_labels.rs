//! Soft labels from an OpenAI-compatible server: the probe at job submission (k honoured, ids
//! or a tokenizer to map texts, base of the values) and turning a response's logprobs into the
//! answer's ids and soft labels.

use super::{excerpt, Attempt, OpenAiTeacher};
use crate::config::LogprobBase;
use crate::domain::job::Endpoint;
use crate::domain::prompt_set::Message;
use crate::domain::render::RenderedRequest;
use crate::teacher::server_logprobs::{self, ServerToken};
use crate::teacher::token_map::parse_token_id;
use crate::teacher::{GenerateOutput, GenerateRequest};

impl OpenAiTeacher {
    /// Asks the server for a short answer with `k` log-probabilities per token and checks what
    /// comes back: that it honours k, gives ids (or texts the teacher's tokenizer maps), and
    /// that its values are natural logs (or the configured base). Remembers whether the server
    /// takes `return_tokens_as_token_ids`.
    pub(super) async fn probe(&self, k: u32, endpoint: Endpoint) -> Result<(), String> {
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

    /// Turns a response's logprobs into the answer's ids and soft labels, checking that the ids
    /// spell the answer when a tokenizer can tell.
    pub(super) fn attach_soft_labels(
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
