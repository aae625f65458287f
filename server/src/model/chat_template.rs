//! The model's own chat template (Jinja, from GGUF metadata or tokenizer_config.json), rendered
//! with minijinja the way Hugging Face's `apply_chat_template` does (trim_blocks, lstrip_blocks,
//! Python string methods), so the teacher sees exactly the prompt its training format expects.

use anyhow::Context;
use minijinja::{Environment, ErrorKind};

use crate::domain::prompt_set::Message;

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> anyhow::Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string()).context("the chat template does not compile")?;
        Ok(ChatTemplate { env, bos: bos.to_string(), eos: eos.to_string() })
    }

    /// The prompt text for `messages`, ending with the assistant's turn opened.
    pub fn render(&self, messages: &[Message]) -> anyhow::Result<String> {
        let t = self.env.get_template("chat").expect("added");
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .context("the chat template failed on this conversation")
    }
}
