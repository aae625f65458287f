//! Re-scoring given answers on an OpenAI-compatible server: the completions endpoint with
//! `echo` + `logprobs` over the conversation rendered by the model's own template.

use std::time::Instant;

use serde_json::json;

use super::{Attempt, OpenAiTeacher};
use crate::domain::job::Endpoint;
use crate::domain::prompt_set::Message;
use crate::domain::render::RenderedRequest;
use crate::teacher::server_logprobs::{self, ServerToken};
use crate::teacher::{GenerateOutput, GenerateRequest, TeacherError};

impl OpenAiTeacher {
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
    pub(super) async fn probe_echo(&self, k: u32) -> Result<(), String> {
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
        // `TokenMap::id` reads `token_id:N` too.
        let id = |t: &str| map.id(t).ok();
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
    pub(super) async fn rescore(&self, req: &GenerateRequest, answer: &str) -> Result<GenerateOutput, TeacherError> {
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
        let (url, body) = self.echo_body(&r.text, req.top_k, true);
        let (_, logprobs, attempts) = self.send_with_retries(req, &url, &body, false).await?;
        let logprobs = logprobs.ok_or_else(|| fatal("the server returned no log-probabilities".into()))?;
        let echoed = server_logprobs::parse(&logprobs, false).map_err(fatal)?;
        let sent: Vec<u32> = r.prompt_ids.iter().chain(&r.answer_ids).copied().collect();
        // An echoed token is the one sent when it maps to its id, or when it is "" for a special
        // token (llama.cpp gives special tokens no text).
        let same = |t: &ServerToken, sent: u32| {
            map.id(&t.token).ok() == Some(sent) || (t.token.is_empty() && map.is_special(sent))
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
                top.iter().find(|t| map.id(&t.0).ok() == Some(aid)).map(|t| t.1)
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
}
