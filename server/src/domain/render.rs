//! Turning a stored prompt plus job parameters into the exact request sent to the teacher,
//! and the dedup cache key of that request.

use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::job::{Endpoint, JobMode, JobParams};
use super::prompt_set::{Message, PromptContent};
use super::Invalid;

/// What the teacher is asked: a conversation (chat endpoint) or raw text (completions).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum RenderedRequest {
    Chat(Vec<Message>),
    Text(String),
}

impl RenderedRequest {
    /// As the API shows it: the messages array, or the text.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            RenderedRequest::Chat(m) => serde_json::to_value(m).expect("messages serialize"),
            RenderedRequest::Text(t) => serde_json::Value::String(t.clone()),
        }
    }

    /// Stored form in `completions.request`: JSON for messages, the text itself otherwise.
    pub fn stored(&self) -> String {
        match self {
            RenderedRequest::Chat(m) => serde_json::to_string(m).expect("messages serialize"),
            RenderedRequest::Text(t) => t.clone(),
        }
    }

    /// A rescore request split into what the teacher is shown and the answer it scores: the
    /// final assistant turn. None for anything else.
    pub fn split_answer(&self) -> Option<(RenderedRequest, String)> {
        match self {
            RenderedRequest::Chat(m) if m.last().is_some_and(|l| l.role == "assistant") => {
                let (last, rest) = m.split_last().expect("non-empty");
                Some((RenderedRequest::Chat(rest.to_vec()), last.content.clone()))
            }
            _ => None,
        }
    }

    /// Rough token count for tokens-per-minute limits (4 bytes a token).
    pub fn estimated_tokens(&self) -> u32 {
        let bytes = match self {
            RenderedRequest::Chat(m) => m.iter().map(|m| m.content.len() + 8).sum(),
            RenderedRequest::Text(t) => t.len(),
        };
        (bytes / 4) as u32 + 1
    }
}

/// A job's compiled prompt template.
pub struct JobTemplate {
    env: Option<Environment<'static>>,
}

impl JobTemplate {
    /// Compiles and checks a template; it must use the `prompt` variable.
    pub fn compile(source: &str) -> Result<Self, Invalid> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_keep_trailing_newline(true);
        env.add_template_owned("job", source.to_string())
            .map_err(|e| Invalid::new("template", format!("template does not compile: {e}")))?;
        let tmpl = env.get_template("job").expect("just added");
        if !tmpl.undeclared_variables(false).contains("prompt") {
            return Err(Invalid::new("template", "template must use {{ prompt }}"));
        }
        Ok(JobTemplate { env: Some(env) })
    }

    /// The template of a job (identity when the job has none).
    pub fn for_params(params: &JobParams) -> Result<Self, Invalid> {
        match &params.template {
            Some(t) => Self::compile(t),
            None => Ok(JobTemplate { env: None }),
        }
    }

    fn apply(&self, text: &str, id: Option<&str>, metadata: &serde_json::Value) -> Result<String, String> {
        let Some(env) = &self.env else { return Ok(text.to_string()) };
        let tmpl = env.get_template("job").expect("compiled");
        tmpl.render(minijinja::context! { prompt => text, id => id, metadata => metadata })
            .map_err(|e| format!("template failed on this prompt: {e}"))
    }
}

/// The parts of a stored prompt that rendering needs.
pub struct PromptView<'a> {
    pub content: &'a PromptContent,
    pub system: Option<&'a str>,
    pub external_id: Option<&'a str>,
    pub metadata: &'a serde_json::Value,
}

/// Renders one prompt for one job. Messages prompts get the template on their last user turn.
/// A rescore job's request keeps the final assistant turn (the answer it scores).
pub fn render(params: &JobParams, template: &JobTemplate, p: &PromptView<'_>) -> Result<RenderedRequest, String> {
    let system = p.system.or(params.system.as_deref());
    let ends_with_answer = match p.content {
        PromptContent::Messages(m) => m.last().is_some_and(|l| l.role == "assistant"),
        PromptContent::Text(_) => false,
    };
    match (params.mode, ends_with_answer) {
        (JobMode::Generate, true) => {
            return Err("mode: this prompt ends with an assistant answer; answers are re-scored by a job with \
                        \"mode\": \"rescore\" (a generate job needs the last turn to be the user's)"
                .into())
        }
        (JobMode::Rescore, false) => {
            return Err("mode: a rescore job needs every prompt to be a conversation ending with the assistant \
                        answer to score; this one does not"
                .into())
        }
        _ => {}
    }
    match (params.endpoint, p.content) {
        (Endpoint::Completions, PromptContent::Text(t)) => {
            Ok(RenderedRequest::Text(template.apply(t, p.external_id, p.metadata)?))
        }
        (Endpoint::Completions, PromptContent::Messages(_)) => Err(
            "the completions endpoint takes text prompts; this prompt is a conversation (use endpoint chat)".into(),
        ),
        (Endpoint::Chat, PromptContent::Text(t)) => {
            let mut msgs = Vec::with_capacity(2);
            if let Some(s) = system {
                msgs.push(Message { role: "system".into(), content: s.to_string() });
            }
            msgs.push(Message { role: "user".into(), content: template.apply(t, p.external_id, p.metadata)? });
            Ok(RenderedRequest::Chat(msgs))
        }
        (Endpoint::Chat, PromptContent::Messages(m)) => {
            let mut msgs = Vec::with_capacity(m.len() + 1);
            if let Some(s) = system.filter(|_| m.first().map(|f| f.role.as_str()) != Some("system")) {
                msgs.push(Message { role: "system".into(), content: s.to_string() });
            }
            msgs.extend(m.iter().cloned());
            let last = msgs.iter_mut().rev().find(|m| m.role == "user").expect("validated: a user turn");
            last.content = template.apply(&last.content, p.external_id, p.metadata)?;
            Ok(RenderedRequest::Chat(msgs))
        }
    }
}

/// Dedup key: sha256 over the teacher identity, the rendered request and every decoding
/// parameter that can change the answer. Greedy decoding makes equal keys equal answers.
pub fn cache_key(teacher_identity: &str, request: &RenderedRequest, params: &JobParams) -> String {
    #[derive(Serialize)]
    struct Key<'a> {
        v: u32,
        teacher: &'a str,
        endpoint: &'a str,
        request: &'a RenderedRequest,
        max_new_tokens: u32,
        stop: &'a [String],
        seed: i64,
        temperature: f32,
        top_p: f32,
        // Left out when off, so keys of plain jobs stay what they were before soft labels.
        #[serde(skip_serializing_if = "Option::is_none")]
        logprobs: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        mode: Option<&'a str>,
    }
    let key = Key {
        v: 1,
        teacher: teacher_identity,
        endpoint: params.endpoint.as_str(),
        request,
        max_new_tokens: params.max_new_tokens,
        stop: &params.stop,
        seed: params.seed,
        temperature: 0.0,
        top_p: 1.0,
        logprobs: (params.logprobs > 0).then_some(params.logprobs),
        mode: (params.mode == JobMode::Rescore).then_some("rescore"),
    };
    let bytes = serde_json::to_vec(&key).expect("key serializes");
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(template: Option<&str>) -> JobParams {
        JobParams {
            endpoint: Endpoint::Chat,
            max_new_tokens: 16,
            template: template.map(str::to_string),
            system: Some("be brief".into()),
            stop: vec![],
            seed: 0,
            logprobs: 0,
            mode: JobMode::Generate,
        }
    }

    #[test]
    fn renders_template_and_system() {
        let p = params(Some("Solve: {{ prompt }}\n"));
        let t = JobTemplate::for_params(&p).unwrap();
        let content = PromptContent::Text("<b>1+1</b>".into());
        let view = PromptView { content: &content, system: None, external_id: None, metadata: &serde_json::Value::Null };
        let r = render(&p, &t, &view).unwrap();
        assert_eq!(
            r,
            RenderedRequest::Chat(vec![
                Message { role: "system".into(), content: "be brief".into() },
                Message { role: "user".into(), content: "Solve: <b>1+1</b>\n".into() },
            ])
        );
    }

    #[test]
    fn cache_key_depends_on_every_decoding_parameter() {
        let p = params(None);
        let r = RenderedRequest::Text("x".into());
        let k = cache_key("t", &r, &p);
        assert_eq!(k, cache_key("t", &r, &p));
        assert_ne!(k, cache_key("u", &r, &p));
        assert_ne!(k, cache_key("t", &RenderedRequest::Text("y".into()), &p));
        let mut q = p.clone();
        q.max_new_tokens = 17;
        assert_ne!(k, cache_key("t", &r, &q));
        let mut q = p.clone();
        q.stop = vec!["\n".into()];
        assert_ne!(k, cache_key("t", &r, &q));
        let mut q = p.clone();
        q.seed = 1;
        assert_ne!(k, cache_key("t", &r, &q));
        let mut q = p.clone();
        q.logprobs = 20;
        assert_ne!(k, cache_key("t", &r, &q));
        let mut q = p.clone();
        q.mode = JobMode::Rescore;
        assert_ne!(k, cache_key("t", &r, &q));
        // Keys of jobs without soft labels are those stored before they existed.
        // (sha256 of the version-1 key JSON, computed outside Rust.)
        assert_eq!(k, "2fec4649247ebfcdd6188feada23f2986f1eb3df4b3fa09ec36aca9a99444411");
    }

    #[test]
    fn rescore_needs_an_answer_and_generate_refuses_one() {
        let mut p = params(Some("Q: {{ prompt }}"));
        let t = JobTemplate::for_params(&p).unwrap();
        let conv = PromptContent::Messages(vec![
            Message { role: "user".into(), content: "2+2?".into() },
            Message { role: "assistant".into(), content: "4".into() },
        ]);
        let view = PromptView { content: &conv, system: None, external_id: None, metadata: &serde_json::Value::Null };
        assert!(render(&p, &t, &view).unwrap_err().starts_with("mode"));
        p.mode = JobMode::Rescore;
        let r = render(&p, &t, &view).unwrap();
        let (shown, answer) = r.split_answer().unwrap();
        assert_eq!(answer, "4");
        // The template goes on the user turn, not on the answer.
        assert_eq!(
            shown,
            RenderedRequest::Chat(vec![
                Message { role: "system".into(), content: "be brief".into() },
                Message { role: "user".into(), content: "Q: 2+2?".into() },
            ])
        );
        let text = PromptContent::Text("2+2?".into());
        let view = PromptView { content: &text, system: None, external_id: None, metadata: &serde_json::Value::Null };
        assert!(render(&p, &t, &view).unwrap_err().starts_with("mode"));
    }
}
