//! The local teacher: a GGUF file or HF folder run in-process, fully offline, on the native
//! engine (Llama family) or mistralrs (other GGUF architectures). It renders the model's own
//! chat template, tokenizes with our tokenizer (so both engines get the same, verified ids),
//! decodes greedily, and reports the exact token ids it used.
//! A model that fails to load leaves the teacher registered but unavailable (the server stays up).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use async_trait::async_trait;
use sha2::{Digest, Sha256};

use super::{GenerateOutput, GenerateRequest, Teacher, TeacherError};
use crate::config::{LocalEngine, Precision, TeacherSettings};
use crate::domain::job::{JobMode, JobParams};
use crate::domain::render::RenderedRequest;
use crate::engine::llama::Llama;
use crate::engine::scheduler::{Generated, Job, Scheduler};
use crate::model::chat_template::ChatTemplate;
use crate::model::gguf::GgufMetadata;
use crate::model::hf::HfFolder;
use crate::model::tokenizer::ModelTokenizer;

/// The engine a loaded model runs on.
enum Engine {
    Native(Scheduler),
    #[cfg(feature = "mistralrs")]
    Mistral(crate::engine::mistral::MistralEngine),
}

/// One request to an engine: decode (or, with `score`, teacher-force) after `prompt`.
struct EngineRequest {
    prompt: Vec<u32>,
    max_new_tokens: usize,
    stop_ids: Vec<u32>,
    stop_check: Option<Box<dyn Fn(&[u32]) -> bool + Send>>,
    top_k: usize,
    score: Option<Vec<u32>>,
}

impl Engine {
    async fn generate(&self, r: EngineRequest) -> Result<Generated, String> {
        match self {
            Engine::Native(scheduler) => {
                let (reply, answer) = tokio::sync::oneshot::channel();
                scheduler.submit(Job {
                    prompt: r.prompt,
                    max_new_tokens: r.max_new_tokens,
                    stop_ids: r.stop_ids,
                    stop_check: r.stop_check,
                    top_k: r.top_k,
                    score: r.score,
                    reply,
                })?;
                answer.await.map_err(|_| "the engine dropped the request".to_string())?
            }
            #[cfg(feature = "mistralrs")]
            Engine::Mistral(m) => {
                if r.score.is_some() {
                    return Err("the mistralrs engine does not score given answers; use the native engine".into());
                }
                m.generate(r.prompt, r.max_new_tokens, r.stop_ids, r.stop_check, r.top_k).await
            }
        }
    }

    /// Whether the engine can teacher-force given answers.
    fn can_score(&self) -> bool {
        matches!(self, Engine::Native(_))
    }
}

struct Loaded {
    tokenizer: Arc<ModelTokenizer>,
    template: ChatTemplate,
    engine: Engine,
    model_name: String,
    identity: String,
}

pub struct LocalTeacher {
    name: String,
    identity: String,
    max_in_flight: usize,
    loaded: Result<Loaded, String>,
}

/// Hash of a file's size and its first and last MiB (a re-quantized or replaced file gets a
/// new identity without hashing gigabytes).
fn hash_file(h: &mut Sha256, path: &Path) -> anyhow::Result<()> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    h.update(len.to_le_bytes());
    let mut buf = vec![0u8; (1 << 20).min(len as usize)];
    f.read_exact(&mut buf)?;
    h.update(&buf);
    f.seek(SeekFrom::Start(len - buf.len() as u64))?;
    f.read_exact(&mut buf)?;
    h.update(&buf);
    Ok(())
}

/// Identity of a model file or folder for the dedup cache.
fn fingerprint(path: &Path, files: &[PathBuf]) -> anyhow::Result<String> {
    let mut h = Sha256::new();
    for f in files {
        hash_file(&mut h, f)?;
    }
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    Ok(format!("local:{name}@{}", &hex::encode(h.finalize())[..16]))
}

/// Checks that `need` bytes fit in the memory available now.
fn check_memory(need: f64) -> anyhow::Result<()> {
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

/// The template given by flag, else the model's own.
fn template(
    file: Option<&Path>,
    own: Option<String>,
    tokenizer: &ModelTokenizer,
    where_: &str,
) -> anyhow::Result<ChatTemplate> {
    let source = match file {
        Some(f) => std::fs::read_to_string(f).with_context(|| format!("cannot read chat template {}", f.display()))?,
        None => own.with_context(|| format!("{where_} has no chat template; give one with --chat-template NAME=FILE"))?,
    };
    let t = |id| tokenizer.token_text(id);
    ChatTemplate::new(&source, &t(tokenizer.special.bos), &t(Some(tokenizer.special.eos)))
}

/// What `load` produces before the engine starts.
struct Parts {
    tokenizer: ModelTokenizer,
    template: ChatTemplate,
    model_name: String,
    identity: String,
}

/// An HF folder (Llama-family safetensors) on the native engine.
fn load_hf_folder(
    dir: &Path,
    max_batch: usize,
    template_file: Option<&Path>,
    precision: Precision,
) -> anyhow::Result<(Parts, Scheduler)> {
    let folder = HfFolder::open(dir)?;
    // f32 or bf16 weights are mapped, converted one tensor at a time and kept as Q8_0 (or f32).
    let kept = match precision {
        Precision::Quantized => 0.6,
        Precision::F32 => 2.0,
    };
    check_memory(folder.weight_bytes() as f64 * kept + (128u64 << 20) as f64)?;
    let mut files = vec![dir.join("config.json"), dir.join("tokenizer.json")];
    files.extend(folder.safetensors.iter().cloned());
    let identity = fingerprint(dir, &files).with_context(|| format!("cannot read {}", dir.display()))?;
    let identity = with_precision(identity, precision);
    let tokenizer = folder.tokenizer()?;
    let template = template(template_file, folder.chat_template()?, &tokenizer, &dir.display().to_string())?;
    let model = Llama::load_hf(&folder, precision)?;
    if tokenizer.vocab_size > model.cfg.vocab {
        anyhow::bail!("tokenizer vocabulary {} is larger than the model's {}", tokenizer.vocab_size, model.cfg.vocab);
    }
    let model_name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| identity.clone());
    Ok((Parts { tokenizer, template, model_name, identity }, Scheduler::start(model, max_batch)))
}

/// The identity of a model run in `precision`: answers from f32 arithmetic are not cached
/// answers of the quantized one.
fn with_precision(identity: String, precision: Precision) -> String {
    match precision {
        Precision::Quantized => identity,
        Precision::F32 => format!("{identity}#f32"),
    }
}

/// Tokenizer, template and identity of a GGUF file, and its architecture.
fn gguf_parts(path: &Path, template_file: Option<&Path>, precision: Precision) -> anyhow::Result<(Parts, String)> {
    // Weights repacked (about 1.2× the file for Q4_1; f32: up to 6.4× for 5-bit Q4_1) plus
    // working buffers.
    let kept = match precision {
        Precision::Quantized => 1.3,
        Precision::F32 => 6.5,
    };
    check_memory(std::fs::metadata(path)?.len() as f64 * kept + (64u64 << 20) as f64)?;
    let identity = fingerprint(path, &[path.to_path_buf()]).with_context(|| format!("cannot read {}", path.display()))?;
    let identity = with_precision(identity, precision);
    let meta = GgufMetadata::read(path)?;
    let arch = meta.opt_string("general.architecture").unwrap_or_default().to_string();
    let tokenizer = ModelTokenizer::from_metadata(&meta)?;
    let own = meta.opt_string("tokenizer.chat_template").map(str::to_string);
    let template = template(template_file, own, &tokenizer, "the GGUF")?;
    let model_name = meta.opt_string("general.name").map(str::to_string).unwrap_or_else(|| identity.clone());
    Ok((Parts { tokenizer, template, model_name, identity }, arch))
}

/// Runs blocking loader code on a blocking thread; a panic becomes an error.
async fn blocking<T: Send + 'static>(what: String, f: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> anyhow::Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => Err(anyhow::anyhow!("the model loader panicked on {what}")),
        Err(e) => Err(anyhow::anyhow!("the model loader failed on {what}: {e}")),
    }
}

async fn load(
    path: PathBuf,
    max_batch: usize,
    template_file: Option<PathBuf>,
    engine: LocalEngine,
    precision: Precision,
) -> anyhow::Result<Loaded> {
    let what = path.display().to_string();
    if path.is_dir() {
        if engine == LocalEngine::Mistralrs {
            anyhow::bail!("the mistralrs engine is used for GGUF files only; HF folders run on the native engine");
        }
        let (parts, scheduler) =
            blocking(what, move || load_hf_folder(&path, max_batch, template_file.as_deref(), precision)).await?;
        return Ok(finish(parts, Engine::Native(scheduler)));
    }
    if !path.exists() {
        anyhow::bail!("model file {} does not exist", path.display());
    }
    let p = path.clone();
    let (parts, arch) = blocking(what.clone(), move || gguf_parts(&p, template_file.as_deref(), precision)).await?;
    let native = match engine {
        LocalEngine::Native => true,
        LocalEngine::Mistralrs => false,
        LocalEngine::Auto => arch == "llama",
    };
    if native {
        let model = blocking(what, move || Llama::load(&path, precision)).await?;
        if model.cfg.vocab != parts.tokenizer.vocab_size {
            anyhow::bail!("model vocabulary {} != tokenizer vocabulary {}", model.cfg.vocab, parts.tokenizer.vocab_size);
        }
        return Ok(finish(parts, Engine::Native(Scheduler::start(model, max_batch))));
    }
    if precision != Precision::Quantized {
        anyhow::bail!("precision f32 is a setting of the native engine; mistralrs runs `{arch}` as the GGUF is stored");
    }
    mistral(parts, &path, &arch).await
}

#[cfg(feature = "mistralrs")]
async fn mistral(parts: Parts, path: &Path, arch: &str) -> anyhow::Result<Loaded> {
    let engine = crate::engine::mistral::MistralEngine::load(path, arch).await?;
    Ok(finish(parts, Engine::Mistral(engine)))
}

#[cfg(not(feature = "mistralrs"))]
async fn mistral(_parts: Parts, _path: &Path, arch: &str) -> anyhow::Result<Loaded> {
    crate::engine::check_mistralrs_architecture(arch)?;
    anyhow::bail!(
        "architecture `{arch}` needs the mistralrs engine (the native engine covers `llama`), and this server \
         was built without it; rebuild with `cargo build --release -p server --features mistralrs`"
    )
}

fn finish(parts: Parts, engine: Engine) -> Loaded {
    Loaded {
        tokenizer: Arc::new(parts.tokenizer),
        template: parts.template,
        engine,
        model_name: parts.model_name,
        identity: parts.identity,
    }
}

impl LocalTeacher {
    /// Loads the model; a failure (missing or corrupt file, unsupported architecture, panic in
    /// the loader) is kept as the teacher's load error instead of stopping the server.
    pub async fn load(settings: &TeacherSettings, path: &Path) -> Self {
        let max_batch = settings.max_in_flight.min(64);
        let result = load(
            path.to_path_buf(),
            max_batch,
            settings.chat_template.clone(),
            settings.local_engine,
            settings.local_precision,
        )
        .await;
        match result {
            Ok(loaded) => {
                tracing::info!(teacher = %settings.name, identity = %loaded.identity, "local model loaded");
                LocalTeacher {
                    name: settings.name.clone(),
                    identity: loaded.identity.clone(),
                    max_in_flight: settings.max_in_flight,
                    loaded: Ok(loaded),
                }
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

    fn token_texts(&self, ids: &[u32]) -> Option<Vec<String>> {
        let tok = &self.loaded.as_ref().ok()?.tokenizer;
        Some(ids.iter().map(|&id| tok.decode(&[id], false).unwrap_or_default()).collect())
    }

    async fn health(&self) -> Result<(), String> {
        self.loaded.as_ref().map(|_| ()).map_err(Clone::clone)
    }

    /// Any k, read from the logits; rescoring on the native engine.
    async fn supports(&self, params: &JobParams) -> Result<(), String> {
        let l = self.loaded.as_ref().map_err(Clone::clone)?;
        if params.mode == JobMode::Rescore && !l.engine.can_score() {
            return Err(format!(
                "teacher `{}` runs on the mistralrs engine, which cannot score given answers; rescore jobs need the native engine",
                self.name
            ));
        }
        Ok(())
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
        // A given answer is scored as the model would have produced it: its tokens, then the
        // end-of-turn token the chat template closes an assistant turn with.
        let score = match &req.answer {
            None => None,
            Some(a) => {
                let mut ids = l.tokenizer.encode(a, false).map_err(|e| fatal(format!("{e:#}")))?;
                ids.push(l.tokenizer.special.eos);
                Some(ids)
            }
        };
        let generated = l
            .engine
            .generate(EngineRequest {
                prompt: prompt.clone(),
                max_new_tokens: req.max_new_tokens as usize,
                stop_ids: l.tokenizer.special.stop.clone(),
                stop_check,
                top_k: req.top_k as usize,
                score,
            })
            .await
            .map_err(fatal)?;
        if req.top_k > 0 && generated.soft_labels.len() != generated.ids.len() {
            return Err(fatal(format!(
                "the engine returned {} soft-label positions for {} tokens",
                generated.soft_labels.len(),
                generated.ids.len()
            )));
        }
        // The text excludes a final end-of-turn token and anything from a stop string on;
        // the ids keep everything the model produced.
        let ids = &generated.ids;
        let body = match ids.last() {
            Some(last) if l.tokenizer.special.stop.contains(last) => &ids[..ids.len() - 1],
            _ => &ids[..],
        };
        let mut text = match &req.answer {
            Some(a) => a.clone(),
            None => l.tokenizer.decode(body, false).map_err(|e| fatal(format!("{e:#}")))?,
        };
        if req.answer.is_none() {
            if let Some(cut) = req.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(cut);
            }
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
            completion_token_ids: Some(generated.ids.clone()),
            soft_labels: (req.top_k > 0).then_some(generated.soft_labels),
        })
    }
}
