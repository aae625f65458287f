//! The local teacher: a GGUF model run in-process by the native engine, fully offline.
//! It renders the model's own chat template, tokenizes with the tokenizer rebuilt from the
//! GGUF, decodes greedily with continuous batching, and reports the exact token ids it used.
//! A model that fails to load leaves the teacher registered but unavailable (the server stays up).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use async_trait::async_trait;
use sha2::{Digest, Sha256};

use super::{GenerateOutput, GenerateRequest, Teacher, TeacherError};
use crate::config::TeacherSettings;
use crate::domain::render::RenderedRequest;
use crate::engine::llama::Llama;
use crate::engine::scheduler::{Job, Scheduler};
use crate::model::chat_template::ChatTemplate;
use crate::model::gguf::GgufMetadata;
use crate::model::tokenizer::GgufTokenizer;

struct Loaded {
    tokenizer: Arc<GgufTokenizer>,
    template: ChatTemplate,
    scheduler: Scheduler,
    model_name: String,
}

pub struct LocalTeacher {
    name: String,
    identity: String,
    max_in_flight: usize,
    loaded: Result<Loaded, String>,
}

/// Identity of a model file for the dedup cache: name, size and a hash of its first and last
/// MiB (a re-quantized or replaced file gets a new identity without hashing gigabytes).
fn fingerprint(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut h = Sha256::new();
    h.update(len.to_le_bytes());
    let mut buf = vec![0u8; (1 << 20).min(len as usize)];
    f.read_exact(&mut buf)?;
    h.update(&buf);
    f.seek(SeekFrom::Start(len - buf.len() as u64))?;
    f.read_exact(&mut buf)?;
    h.update(&buf);
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    Ok(format!("local:{name}@{}", &hex::encode(h.finalize())[..16]))
}

/// Memory the engine needs for a model file: the weights repacked (about 1.2× the file for
/// Q4_1) plus working buffers.
fn check_memory(path: &Path) -> anyhow::Result<()> {
    let size = std::fs::metadata(path)?.len() as f64;
    let need = size * 1.3 + (64u64 << 20) as f64;
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let available = meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb * 1024.0);
    if let Some(avail) = available {
        if need > avail {
            anyhow::bail!(
                "the model needs about {:.1} GiB of memory and only {:.1} GiB is available; use a smaller or more quantized model",
                need / (1u64 << 30) as f64,
                avail / (1u64 << 30) as f64
            );
        }
    }
    Ok(())
}

fn load(path: &Path, max_batch: usize, template_file: Option<&Path>) -> anyhow::Result<(Loaded, String)> {
    if !path.exists() {
        anyhow::bail!("model file {} does not exist", path.display());
    }
    check_memory(path)?;
    let identity = fingerprint(path).with_context(|| format!("cannot read {}", path.display()))?;
    let meta = GgufMetadata::read(path)?;
    let tokenizer = GgufTokenizer::from_metadata(&meta)?;
    let from_file = match template_file {
        Some(f) => Some(std::fs::read_to_string(f).with_context(|| format!("cannot read chat template {}", f.display()))?),
        None => None,
    };
    let tmpl = match &from_file {
        Some(t) => t.as_str(),
        None => meta.opt_string("tokenizer.chat_template").context(
            "the GGUF has no tokenizer.chat_template; give one with --chat-template NAME=FILE",
        )?,
    };
    let token = |id: Option<u32>| id.and_then(|i| tokenizer.tokenizer.id_to_token(i)).unwrap_or_default();
    let template = ChatTemplate::new(tmpl, &token(tokenizer.special.bos), &token(Some(tokenizer.special.eos)))?;
    let model = Llama::load(path)?;
    if model.cfg.vocab != tokenizer.vocab_size {
        anyhow::bail!("model vocabulary {} != tokenizer vocabulary {}", model.cfg.vocab, tokenizer.vocab_size);
    }
    let model_name = meta.opt_string("general.name").map(str::to_string).unwrap_or_else(|| identity.clone());
    let scheduler = Scheduler::start(model, max_batch);
    Ok((Loaded { tokenizer: Arc::new(tokenizer), template, scheduler, model_name }, identity))
}

impl LocalTeacher {
    /// Loads the model; a failure (missing or corrupt file, unsupported architecture, panic in
    /// the loader) is kept as the teacher's load error instead of stopping the server.
    pub fn load(settings: &TeacherSettings, path: &PathBuf) -> Self {
        let max_batch = settings.max_in_flight.min(64);
        let template = settings.chat_template.as_deref();
        let result = std::panic::catch_unwind(|| load(path, max_batch, template))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the model loader panicked on {}", path.display())));
        match result {
            Ok((loaded, identity)) => {
                tracing::info!(teacher = %settings.name, %identity, "local model loaded");
                LocalTeacher { name: settings.name.clone(), identity, max_in_flight: settings.max_in_flight, loaded: Ok(loaded) }
            }
            Err(e) => {
                let msg = format!("local teacher `{}` could not load {}: {e:#}", settings.name, path.display());
                tracing::error!("{msg}");
                LocalTeacher {
                    name: settings.name.clone(),
                    identity: format!("local:{}", path.display()),
                    max_in_flight: settings.max_in_flight,
                    loaded: Err(msg),
                }
            }
        }
    }
}

#[async_trait]
impl Teacher for LocalTeacher {
    fn name(&self) -> &str {
        &self.name
    }

    fn identity(&self) -> &str {
        &self.identity
    }

    fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    fn load_error(&self) -> Option<String> {
        self.loaded.as_ref().err().cloned()
    }

    async fn health(&self) -> Result<(), String> {
        self.loaded.as_ref().map(|_| ()).map_err(Clone::clone)
    }

    async fn generate(&self, req: &GenerateRequest) -> Result<GenerateOutput, TeacherError> {
        let fatal = |message: String| TeacherError::Fatal { message, attempts: 1 };
        let l = self.loaded.as_ref().map_err(|e| fatal(e.clone()))?;
        let started = Instant::now();
        let text = match &req.request {
            RenderedRequest::Chat(messages) => l.template.render(messages).map_err(|e| fatal(format!("{e:#}")))?,
            RenderedRequest::Text(t) => t.clone(),
        };
        let mut prompt = Vec::new();
        if l.tokenizer.special.add_bos {
            prompt.extend(l.tokenizer.special.bos);
        }
        prompt.extend(l.tokenizer.encode(&text, true).map_err(|e| fatal(format!("{e:#}")))?);
        let stops = req.stop.clone();
        let stop_check: Option<Box<dyn Fn(&[u32]) -> bool + Send>> = if stops.is_empty() {
            None
        } else {
            let tok = Arc::clone(&l.tokenizer);
            Some(Box::new(move |ids: &[u32]| {
                let text = tok.decode(ids, false).unwrap_or_default();
                stops.iter().any(|s| text.contains(s.as_str()))
            }))
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job {
            prompt: prompt.clone(),
            max_new_tokens: req.max_new_tokens as usize,
            stop_ids: l.tokenizer.special.stop.clone(),
            stop_check,
            reply,
        };
        l.scheduler.submit(job).map_err(fatal)?;
        let generated = answer
            .await
            .map_err(|_| fatal("the engine dropped the request".into()))?
            .map_err(fatal)?;
        // The text excludes a final end-of-turn token and anything from a stop string on;
        // the ids keep everything the model produced.
        let ids = &generated.ids;
        let body = match ids.last() {
            Some(last) if l.tokenizer.special.stop.contains(last) => &ids[..ids.len() - 1],
            _ => &ids[..],
        };
        let mut text = l.tokenizer.decode(body, false).map_err(|e| fatal(format!("{e:#}")))?;
        if let Some(cut) = req.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(cut);
        }
        Ok(GenerateOutput {
            text,
            finish_reason: Some(generated.finish.to_string()),
            prompt_tokens: Some(prompt.len() as i64),
            completion_tokens: Some(ids.len() as i64),
            model: Some(l.model_name.clone()),
            system_fingerprint: Some(self.identity.clone()),
            latency: started.elapsed(),
            http_attempts: 1,
            prompt_token_ids: Some(prompt),
            completion_token_ids: Some(generated.ids),
        })
    }
}
