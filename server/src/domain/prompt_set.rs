//! Prompt sets: what a submission may contain, and the validated form stored in `prompts`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Invalid;

/// Most prompts accepted in one set.
pub const MAX_PROMPTS: usize = 5_000_000;

/// A chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

/// JSON body of `POST /v1/prompt-sets`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromptSetRequest {
    pub name: String,
    pub prompts: Vec<PromptInput>,
}

/// One prompt: either `prompt` (text) or `messages` (a conversation ending with a user turn).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromptInput {
    /// Your own id for the prompt (string or integer), kept in exports.
    #[schema(value_type = Option<String>)]
    pub id: Option<serde_json::Value>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<Message>>,
    /// System prompt for this prompt; overrides the job's `system`.
    pub system: Option<String>,
    /// Any JSON object; passed through to exports and available to templates as `metadata`.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A prompt's content.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptContent {
    Text(String),
    Messages(Vec<Message>),
}

/// A validated prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct NewPrompt {
    pub external_id: Option<String>,
    pub content: PromptContent,
    pub system: Option<String>,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Where a prompt set came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Json,
    Jsonl,
    Csv,
    Parquet,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Json => "json",
            Source::Jsonl => "jsonl",
            Source::Csv => "csv",
            Source::Parquet => "parquet",
        }
    }
}

/// A validated prompt set, ready to insert.
#[derive(Debug)]
pub struct NewPromptSet {
    pub name: String,
    pub source: Source,
    pub prompts: Vec<NewPrompt>,
}

pub fn validate_name(name: &str, field: &str) -> Result<String, Invalid> {
    if name.trim().is_empty() {
        return Err(Invalid::new(field, "name must not be empty"));
    }
    if name.len() > 256 {
        return Err(Invalid::new(field, "name must be at most 256 bytes"));
    }
    Ok(name.to_string())
}

fn validate_messages(messages: Vec<Message>, field: &str, has_system: bool) -> Result<Vec<Message>, Invalid> {
    if messages.is_empty() {
        return Err(Invalid::new(field, "messages must not be empty"));
    }
    for (i, m) in messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            return Err(Invalid::new(
                format!("{field}[{i}].role"),
                format!("role `{}` is not one of system, user, assistant", m.role),
            ));
        }
        if m.role == "system" && (i != 0 || has_system) {
            return Err(Invalid::new(
                format!("{field}[{i}].role"),
                "a system message may only come first, and not together with `system`",
            ));
        }
    }
    // A final assistant turn is an answer to re-score (jobs with `"mode": "rescore"`); it must
    // follow a user turn.
    let n = messages.len();
    let last_ok = match messages[n - 1].role.as_str() {
        "user" => true,
        "assistant" => n >= 2 && messages[n - 2].role == "user",
        _ => false,
    };
    if !last_ok {
        return Err(Invalid::new(
            format!("{field}[{}].role", n - 1),
            "the last message must be from the user (the teacher answers it), or an assistant answer to a user \
             turn (re-scored by a rescore job)",
        ));
    }
    Ok(messages)
}

/// Turns a submitted id (string or integer) into its stored text form.
pub fn external_id(value: Option<serde_json::Value>, field: &str) -> Result<Option<String>, Invalid> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(serde_json::Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(Invalid::new(field, "id must be a string or a number")),
    }
}

impl PromptInput {
    /// Validates one prompt; `field` is its JSON path, e.g. `prompts[3]`.
    pub fn validate(self, field: &str) -> Result<NewPrompt, Invalid> {
        let external_id = external_id(self.id, &format!("{field}.id"))?;
        let content = match (self.prompt, self.messages) {
            (Some(p), None) => {
                if p.is_empty() {
                    return Err(Invalid::new(format!("{field}.prompt"), "prompt must not be empty"));
                }
                PromptContent::Text(p)
            }
            (None, Some(m)) => PromptContent::Messages(validate_messages(
                m,
                &format!("{field}.messages"),
                self.system.is_some(),
            )?),
            (Some(_), Some(_)) => {
                return Err(Invalid::new(field, "give either `prompt` or `messages`, not both"))
            }
            (None, None) => {
                return Err(Invalid::new(format!("{field}.prompt"), "each prompt needs `prompt` or `messages`"))
            }
        };
        Ok(NewPrompt { external_id, content, system: self.system, metadata: self.metadata })
    }
}

impl PromptSetRequest {
    pub fn validate(self) -> Result<NewPromptSet, Invalid> {
        let name = validate_name(&self.name, "name")?;
        let prompts = self
            .prompts
            .into_iter()
            .enumerate()
            .map(|(i, p)| p.validate(&format!("prompts[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        check_count(prompts.len(), "prompts")?;
        Ok(NewPromptSet { name, source: Source::Json, prompts })
    }
}

pub fn check_count(n: usize, field: &str) -> Result<(), Invalid> {
    if n == 0 {
        return Err(Invalid::new(field, "a prompt set needs at least one prompt"));
    }
    if n > MAX_PROMPTS {
        return Err(Invalid::new(field, format!("a prompt set holds at most {MAX_PROMPTS} prompts")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> Result<NewPromptSet, Invalid> {
        serde_json::from_str::<PromptSetRequest>(json).unwrap().validate()
    }

    #[test]
    fn accepts_text_and_messages() {
        let s = req(r#"{"name":"a","prompts":[{"prompt":"hi","id":7},{"messages":[{"role":"user","content":"x"}]}]}"#).unwrap();
        assert_eq!(s.prompts.len(), 2);
        assert_eq!(s.prompts[0].external_id.as_deref(), Some("7"));
    }

    #[test]
    fn names_the_bad_field() {
        assert_eq!(req(r#"{"name":"a","prompts":[]}"#).unwrap_err().field, "prompts");
        assert_eq!(req(r#"{"name":" ","prompts":[{"prompt":"x"}]}"#).unwrap_err().field, "name");
        assert_eq!(req(r#"{"name":"a","prompts":[{"prompt":"x"},{}]}"#).unwrap_err().field, "prompts[1].prompt");
        assert_eq!(
            req(r#"{"name":"a","prompts":[{"messages":[{"role":"system","content":"x"},{"role":"assistant","content":"y"}]}]}"#)
                .unwrap_err()
                .field,
            "prompts[0].messages[1].role"
        );
        assert_eq!(
            req(r#"{"name":"a","prompts":[{"messages":[{"role":"user","content":"x"},{"role":"system","content":"y"}]}]}"#)
                .unwrap_err()
                .field,
            "prompts[0].messages[1].role"
        );
        // An answer to re-score.
        assert!(req(r#"{"name":"a","prompts":[{"messages":[{"role":"user","content":"x"},{"role":"assistant","content":"y"}]}]}"#).is_ok());
        assert_eq!(
            req(r#"{"name":"a","prompts":[{"messages":[{"role":"bot","content":"x"}]}]}"#).unwrap_err().field,
            "prompts[0].messages[0].role"
        );
    }
}
