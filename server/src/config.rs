//! Command-line flags, the optional TOML config file, and the settings they resolve to.
//! Every flag can also come from `--config FILE.toml` under the same name (snake_case);
//! a flag given on the command line wins over the file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use serde::Deserialize;

/// Re-exported: a teacher setting, parsed from the command line and the TOML file.
pub use crate::engine::llama::Precision;

/// Knowledge-distillation generation server: submit prompt sets over REST, run greedy
/// generation jobs against a teacher, get every answer recorded durably in SQLite.
#[derive(Debug, Parser)]
#[command(name = "server", version, about)]
pub struct Cli {
    /// TOML file with any of these settings (flags given here override it).
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,

    /// SQLite database holding prompt sets, jobs and generations (created if missing).
    #[arg(long, value_name = "PATH", env = "DISTILL_DB")]
    pub db: Option<PathBuf>,

    /// Address to listen on. Anything but loopback requires --api-token.
    #[arg(long, value_name = "ADDR", env = "DISTILL_BIND")]
    pub bind: Option<SocketAddr>,

    /// A teacher, as NAME=SPEC; repeatable. SPEC is `openai:BASE_URL#MODEL`
    /// (an OpenAI-compatible server: vLLM, SGLang, llama.cpp, Ollama, OpenAI, ...) or
    /// `local:PATH` (a GGUF file or an HF folder with config.json, *.safetensors and
    /// tokenizer.json, run in-process).
    /// The API key, if any, is read from the env var TEACHER_<NAME>_API_KEY.
    #[arg(long = "teacher", value_name = "NAME=SPEC")]
    pub teachers: Vec<String>,

    /// Chat template for a local teacher, as NAME=FILE (Jinja); default: the one in its GGUF.
    #[arg(long = "chat-template", value_name = "NAME=FILE")]
    pub chat_templates: Vec<String>,

    /// Engine for a local teacher, as NAME=ENGINE: `auto` (default: the native engine for
    /// Llama-family models, mistralrs for other GGUF architectures), `native` or `mistralrs`.
    #[arg(long = "local-engine", value_name = "NAME=ENGINE")]
    pub local_engines: Vec<String>,

    /// Arithmetic of a local teacher on the native engine, as NAME=PRECISION: `quantized`
    /// (default: llama.cpp's, weights as in the file, 8-bit activations) or `f32` (weights
    /// dequantized at load: the model's exact distribution, ~4x the memory, slower).
    #[arg(long = "local-precision", value_name = "NAME=PRECISION")]
    pub local_precisions: Vec<String>,

    /// Tokenizer of an OpenAI-compatible teacher, as NAME=PATH (a GGUF file, a tokenizer.json or
    /// a folder with one): maps the token texts a server returns with logprobs to ids, for
    /// servers that do not return ids (llama.cpp, mistral.rs; vLLM returns them).
    #[arg(long = "teacher-tokenizer", value_name = "NAME=PATH")]
    pub teacher_tokenizers: Vec<String>,

    /// Extra JSON fields for every request of an OpenAI-compatible teacher, as NAME=JSON, for
    /// server-specific decoding settings, e.g. llama-cpp-python's server applies a repeat
    /// penalty of 1.1 unless sent `llama={"repeat_penalty": 1.0}`. Part of the cache identity.
    #[arg(long = "teacher-body", value_name = "NAME=JSON")]
    pub teacher_bodies: Vec<String>,

    /// Base of the log-probabilities an OpenAI-compatible teacher reports, as NAME=BASE: `e`
    /// (default: OpenAI, vLLM, llama.cpp) or `10` (mistral.rs); stored values are natural logs.
    #[arg(long = "logprob-base", value_name = "NAME=BASE")]
    pub logprob_bases: Vec<String>,

    /// Bearer token required on every /v1 call and /metrics (env DISTILL_API_TOKEN).
    #[arg(long, value_name = "TOKEN", env = "DISTILL_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,

    /// Requests in flight per teacher (default 32).
    #[arg(long, value_name = "N")]
    pub max_in_flight: Option<usize>,

    /// Requests per minute per teacher (default: unlimited).
    #[arg(long, value_name = "N")]
    pub requests_per_minute: Option<u32>,

    /// Tokens per minute per teacher, counting prompt (estimated) plus max_new_tokens (default: unlimited).
    #[arg(long, value_name = "N")]
    pub tokens_per_minute: Option<u32>,

    /// Timeout of one teacher request, in seconds (default 600).
    #[arg(long, value_name = "SECS")]
    pub request_timeout_secs: Option<u64>,

    /// Retries of one request on 429/5xx/timeouts/connection errors before the item is requeued (default 6).
    #[arg(long, value_name = "N")]
    pub max_retries: Option<u32>,

    /// Times an item is claimed before it is marked failed (default 3).
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,

    /// Lease on a claimed item, in seconds; renewed while the request runs (default 60).
    #[arg(long, value_name = "SECS")]
    pub lease_secs: Option<u64>,

    /// Largest accepted request body, in MiB (default 64).
    #[arg(long, value_name = "MIB")]
    pub body_limit_mib: Option<usize>,

    /// On SIGTERM, how long to wait for in-flight requests to finish, in seconds (default 120).
    #[arg(long, value_name = "SECS")]
    pub drain_timeout_secs: Option<u64>,

    /// Print the OpenAPI document and exit.
    #[arg(long)]
    pub print_openapi: bool,
}

/// The TOML file: the same settings as the flags, plus per-teacher overrides.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub db: Option<PathBuf>,
    pub bind: Option<SocketAddr>,
    pub api_token: Option<String>,
    pub max_in_flight: Option<usize>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    pub request_timeout_secs: Option<u64>,
    pub max_retries: Option<u32>,
    pub max_attempts: Option<u32>,
    pub lease_secs: Option<u64>,
    pub body_limit_mib: Option<usize>,
    pub drain_timeout_secs: Option<u64>,
    #[serde(default)]
    pub teachers: BTreeMap<String, FileTeacher>,
}

/// A teacher in the TOML file: either `name = "SPEC"` or a table with overrides.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum FileTeacher {
    Spec(String),
    Table(FileTeacherTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTeacherTable {
    pub spec: String,
    pub max_in_flight: Option<usize>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    pub request_timeout_secs: Option<u64>,
    pub max_retries: Option<u32>,
    /// Jinja chat template file for a local teacher (default: the model's own).
    pub chat_template: Option<PathBuf>,
    /// Engine for a local teacher: auto, native or mistralrs.
    pub engine: Option<String>,
    /// Arithmetic of a local teacher on the native engine: quantized or f32.
    pub precision: Option<String>,
    /// Tokenizer of an OpenAI-compatible teacher (maps returned token texts to ids).
    pub tokenizer: Option<PathBuf>,
    /// Base of an OpenAI-compatible teacher's log-probabilities: "e" or "10".
    pub logprob_base: Option<String>,
    /// Extra fields for every request body of an OpenAI-compatible teacher.
    pub body: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Applies `flag NAME=VALUE` arguments to the teachers they name.
fn per_teacher(
    teachers: &mut [TeacherSettings],
    flag: &str,
    example: &str,
    args: &[String],
    apply: impl Fn(&mut TeacherSettings, &str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    for arg in args {
        let Some((name, value)) = arg.split_once('=') else {
            bail!("{flag} `{arg}` must be NAME=VALUE, e.g. {flag} {example}");
        };
        let t = teachers.iter_mut().find(|t| t.name == name).with_context(|| {
            format!("{flag} names teacher `{name}`, but no --teacher {name}=... is configured")
        })?;
        apply(t, value).with_context(|| format!("{flag} `{arg}`"))?;
    }
    Ok(())
}

/// Which engine runs a local teacher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LocalEngine {
    /// The native engine for Llama-family models, mistralrs for other GGUF architectures.
    #[default]
    Auto,
    Native,
    Mistralrs,
}

impl std::str::FromStr for LocalEngine {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "auto" => Ok(LocalEngine::Auto),
            "native" => Ok(LocalEngine::Native),
            "mistralrs" => Ok(LocalEngine::Mistralrs),
            other => bail!("local engine `{other}` is unknown; use auto, native or mistralrs"),
        }
    }
}

/// Where a teacher lives.
#[derive(Clone, PartialEq, Eq)]
pub enum TeacherSpec {
    /// An OpenAI-compatible HTTP server.
    OpenAi { base_url: String, model: String },
    /// A GGUF file or HF folder run in-process.
    Local { path: PathBuf },
}

impl std::fmt::Debug for TeacherSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.identity())
    }
}

impl TeacherSpec {
    /// Parses `openai:BASE_URL#MODEL`.
    pub fn parse(spec: &str) -> anyhow::Result<Self> {
        let Some((kind, rest)) = spec.split_once(':') else {
            bail!("teacher spec `{spec}` has no kind; expected `openai:BASE_URL#MODEL`");
        };
        match kind {
            "openai" => {
                let Some((url, model)) = rest.rsplit_once('#') else {
                    bail!("teacher spec `{spec}` has no model; expected `openai:BASE_URL#MODEL`, e.g. openai:http://127.0.0.1:8000/v1#Qwen/Qwen2.5-7B-Instruct");
                };
                let parsed = reqwest::Url::parse(url)
                    .with_context(|| format!("teacher spec `{spec}`: `{url}` is not a URL"))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    bail!("teacher spec `{spec}`: base URL must be http or https");
                }
                if model.trim().is_empty() {
                    bail!("teacher spec `{spec}`: model after `#` is empty");
                }
                Ok(TeacherSpec::OpenAi {
                    base_url: url.trim_end_matches('/').to_string(),
                    model: model.to_string(),
                })
            }
            "local" => {
                if rest.is_empty() {
                    bail!("teacher spec `{spec}` has no path; expected `local:PATH` to a GGUF file or an HF model folder");
                }
                Ok(TeacherSpec::Local { path: PathBuf::from(rest) })
            }
            other => bail!("teacher spec `{spec}`: unknown kind `{other}`; supported: openai, local"),
        }
    }

    /// Stable identity used in the dedup cache key; never contains secrets.
    pub fn identity(&self) -> String {
        match self {
            TeacherSpec::OpenAi { base_url, model } => format!("openai:{base_url}#{model}"),
            TeacherSpec::Local { path } => format!("local:{}", path.display()),
        }
    }
}

/// A resolved teacher configuration.
#[derive(Clone)]
pub struct TeacherSettings {
    pub name: String,
    pub spec: TeacherSpec,
    pub api_key: Option<String>,
    pub max_in_flight: usize,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    pub request_timeout: Duration,
    pub max_retries: u32,
    /// Chat template file overriding the model's own (local teachers).
    pub chat_template: Option<PathBuf>,
    /// Engine of a local teacher.
    pub local_engine: LocalEngine,
    /// Arithmetic of a local teacher on the native engine.
    pub local_precision: Precision,
    /// Tokenizer of an OpenAI-compatible teacher, for servers that return token texts.
    pub tokenizer: Option<PathBuf>,
    /// Base of an OpenAI-compatible teacher's log-probabilities.
    pub logprob_base: LogprobBase,
    /// Extra fields merged into every request body (OpenAI-compatible teachers).
    pub extra_body: serde_json::Map<String, serde_json::Value>,
}

/// Request fields the OpenAI-compatible teacher sets itself; `--teacher-body` may not change them.
const OWN_BODY_FIELDS: [&str; 14] = [
    "model", "messages", "prompt", "temperature", "top_p", "n", "seed", "max_tokens", "stop", "stream", "logprobs",
    "top_logprobs", "return_tokens_as_token_ids", "echo",
];

fn check_extra_body(body: &serde_json::Map<String, serde_json::Value>) -> anyhow::Result<()> {
    if let Some(k) = body.keys().find(|k| OWN_BODY_FIELDS.contains(&k.as_str())) {
        bail!("`{k}` is set by the server itself (greedy decoding, the job's parameters); leave it out of the extra body");
    }
    Ok(())
}

/// The base a server's log-probabilities are in; stored ones are always natural.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogprobBase {
    #[default]
    E,
    Ten,
}

impl LogprobBase {
    /// Factor that turns the server's values into natural logs.
    pub fn to_natural(self) -> f64 {
        match self {
            LogprobBase::E => 1.0,
            LogprobBase::Ten => std::f64::consts::LN_10,
        }
    }
}

impl std::str::FromStr for LogprobBase {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "e" => Ok(LogprobBase::E),
            "10" => Ok(LogprobBase::Ten),
            other => bail!("log-probability base `{other}`: use e or 10"),
        }
    }
}

impl std::fmt::Debug for TeacherSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TeacherSettings")
            .field("name", &self.name)
            .field("spec", &self.spec)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("max_in_flight", &self.max_in_flight)
            .field("requests_per_minute", &self.requests_per_minute)
            .field("tokens_per_minute", &self.tokens_per_minute)
            .field("request_timeout", &self.request_timeout)
            .field("max_retries", &self.max_retries)
            .field("chat_template", &self.chat_template)
            .field("local_engine", &self.local_engine)
            .field("local_precision", &self.local_precision)
            .field("tokenizer", &self.tokenizer)
            .field("logprob_base", &self.logprob_base)
            .field("extra_body", &self.extra_body)
            .finish()
    }
}

/// Everything the server needs to start.
#[derive(Clone)]
pub struct Settings {
    pub db: PathBuf,
    pub bind: SocketAddr,
    pub api_token: Option<String>,
    pub teachers: Vec<TeacherSettings>,
    pub max_attempts: u32,
    pub lease: Duration,
    pub body_limit: usize,
    pub drain_timeout: Duration,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("db", &self.db)
            .field("bind", &self.bind)
            .field("api_token", &self.api_token.as_ref().map(|_| "<redacted>"))
            .field("teachers", &self.teachers)
            .field("max_attempts", &self.max_attempts)
            .field("lease", &self.lease)
            .field("body_limit", &self.body_limit)
            .field("drain_timeout", &self.drain_timeout)
            .finish()
    }
}

/// Env var holding a teacher's API key: `TEACHER_<NAME>_API_KEY`, NAME upper-cased, `-` as `_`.
pub fn api_key_env_var(name: &str) -> String {
    format!("TEACHER_{}_API_KEY", name.to_ascii_uppercase().replace('-', "_"))
}

fn validate_teacher_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        bail!("teacher name `{name}` must be 1-64 characters of A-Z, a-z, 0-9, `_` or `-`");
    }
    Ok(())
}

impl Settings {
    /// Defaults for tests and embedding: in-memory nothing, one DB path, loopback on port 0.
    pub fn for_db(db: impl Into<PathBuf>) -> Self {
        Settings {
            db: db.into(),
            bind: "127.0.0.1:0".parse().unwrap(),
            api_token: None,
            teachers: Vec::new(),
            max_attempts: 3,
            lease: Duration::from_secs(60),
            body_limit: 64 << 20,
            drain_timeout: Duration::from_secs(120),
        }
    }

    /// A teacher with the default limits.
    pub fn teacher_defaults(name: &str, spec: TeacherSpec) -> TeacherSettings {
        TeacherSettings {
            name: name.to_string(),
            spec,
            api_key: std::env::var(api_key_env_var(name)).ok().filter(|k| !k.is_empty()),
            max_in_flight: 32,
            requests_per_minute: None,
            tokens_per_minute: None,
            request_timeout: Duration::from_secs(600),
            max_retries: 6,
            chat_template: None,
            local_engine: LocalEngine::Auto,
            local_precision: Precision::Quantized,
            tokenizer: None,
            logprob_base: LogprobBase::E,
            extra_body: serde_json::Map::new(),
        }
    }

    /// Merges flags over the config file over defaults, and checks the result.
    pub fn from_cli(cli: Cli) -> anyhow::Result<Self> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                toml::from_str::<FileConfig>(&text).with_context(|| {
                    format!("config file {} is not valid; fix the entry named below", path.display())
                })?
            }
            None => FileConfig::default(),
        };
        let max_in_flight = cli.max_in_flight.or(file.max_in_flight).unwrap_or(32);
        let rpm = cli.requests_per_minute.or(file.requests_per_minute);
        let tpm = cli.tokens_per_minute.or(file.tokens_per_minute);
        let timeout = cli.request_timeout_secs.or(file.request_timeout_secs).unwrap_or(600);
        let max_retries = cli.max_retries.or(file.max_retries).unwrap_or(6);

        let mut teachers: Vec<TeacherSettings> = Vec::new();
        let base = |name: &str, spec: &str| -> anyhow::Result<TeacherSettings> {
            validate_teacher_name(name)?;
            let mut t = Settings::teacher_defaults(name, TeacherSpec::parse(spec)?);
            t.max_in_flight = max_in_flight;
            t.requests_per_minute = rpm;
            t.tokens_per_minute = tpm;
            t.request_timeout = Duration::from_secs(timeout);
            t.max_retries = max_retries;
            Ok(t)
        };
        for (name, entry) in &file.teachers {
            let t = match entry {
                FileTeacher::Spec(spec) => base(name, spec)?,
                FileTeacher::Table(tab) => {
                    let mut t = base(name, &tab.spec)?;
                    if let Some(v) = tab.max_in_flight {
                        t.max_in_flight = v;
                    }
                    t.requests_per_minute = tab.requests_per_minute.or(t.requests_per_minute);
                    t.tokens_per_minute = tab.tokens_per_minute.or(t.tokens_per_minute);
                    if let Some(v) = tab.request_timeout_secs {
                        t.request_timeout = Duration::from_secs(v);
                    }
                    if let Some(v) = tab.max_retries {
                        t.max_retries = v;
                    }
                    t.chat_template = tab.chat_template.clone();
                    if let Some(e) = &tab.engine {
                        t.local_engine = e.parse().with_context(|| format!("teacher `{name}`: engine"))?;
                    }
                    if let Some(p) = &tab.precision {
                        t.local_precision = p.parse().with_context(|| format!("teacher `{name}`: precision"))?;
                    }
                    t.tokenizer = tab.tokenizer.clone();
                    if let Some(b) = &tab.body {
                        check_extra_body(b).with_context(|| format!("teacher `{name}`: body"))?;
                        t.extra_body = b.clone();
                    }
                    if let Some(b) = &tab.logprob_base {
                        t.logprob_base = b.parse().with_context(|| format!("teacher `{name}`: logprob_base"))?;
                    }
                    t
                }
            };
            teachers.push(t);
        }
        for arg in &cli.teachers {
            let Some((name, spec)) = arg.split_once('=') else {
                bail!("--teacher `{arg}` must be NAME=SPEC, e.g. --teacher vllm=openai:http://127.0.0.1:8000/v1#Qwen/Qwen2.5-7B-Instruct");
            };
            let t = base(name, spec)?;
            teachers.retain(|old| old.name != t.name);
            teachers.push(t);
        }
        per_teacher(&mut teachers, "--chat-template", "smol=prompts/templates/chatml.j2", &cli.chat_templates, |t, file| {
            t.chat_template = Some(PathBuf::from(file));
            Ok(())
        })?;
        per_teacher(&mut teachers, "--local-engine", "smol=mistralrs", &cli.local_engines, |t, v| {
            t.local_engine = v.parse()?;
            Ok(())
        })?;
        per_teacher(&mut teachers, "--local-precision", "smol=f32", &cli.local_precisions, |t, v| {
            t.local_precision = v.parse()?;
            Ok(())
        })?;
        per_teacher(&mut teachers, "--teacher-tokenizer", "llama=models/model.gguf", &cli.teacher_tokenizers, |t, v| {
            t.tokenizer = Some(PathBuf::from(v));
            Ok(())
        })?;
        per_teacher(&mut teachers, "--teacher-body", r#"llama={"repeat_penalty":1.0}"#, &cli.teacher_bodies, |t, v| {
            let body: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(v).context("the value must be a JSON object")?;
            check_extra_body(&body)?;
            t.extra_body = body;
            Ok(())
        })?;
        per_teacher(&mut teachers, "--logprob-base", "mistralrs=10", &cli.logprob_bases, |t, v| {
            t.logprob_base = v.parse()?;
            Ok(())
        })?;
        for t in &teachers {
            if t.max_in_flight == 0 || t.max_in_flight > 4096 {
                bail!("teacher `{}`: max_in_flight must be 1..=4096", t.name);
            }
            if t.requests_per_minute == Some(0) || t.tokens_per_minute == Some(0) {
                bail!("teacher `{}`: rate limits must be positive (leave them out for no limit)", t.name);
            }
            if t.request_timeout.is_zero() {
                bail!("teacher `{}`: request_timeout_secs must be positive", t.name);
            }
        }

        let settings = Settings {
            db: cli.db.or(file.db).unwrap_or_else(|| PathBuf::from("gen.sqlite")),
            bind: cli
                .bind
                .or(file.bind)
                .unwrap_or_else(|| "127.0.0.1:8080".parse().unwrap()),
            api_token: cli.api_token.or(file.api_token).filter(|t| !t.is_empty()),
            teachers,
            max_attempts: cli.max_attempts.or(file.max_attempts).unwrap_or(3).max(1),
            lease: Duration::from_secs(cli.lease_secs.or(file.lease_secs).unwrap_or(60).max(1)),
            body_limit: cli.body_limit_mib.or(file.body_limit_mib).unwrap_or(64).max(1) << 20,
            drain_timeout: Duration::from_secs(
                cli.drain_timeout_secs.or(file.drain_timeout_secs).unwrap_or(120),
            ),
        };
        settings.check_bind()?;
        Ok(settings)
    }

    /// Refuses a non-loopback bind without a token: the API can spend money on paid teachers.
    pub fn check_bind(&self) -> anyhow::Result<()> {
        if !self.bind.ip().is_loopback() && self.api_token.is_none() {
            bail!(
                "refusing to listen on {} without --api-token: anyone on the network could submit jobs. \
                 Pass --api-token TOKEN (or set DISTILL_API_TOKEN), or bind 127.0.0.1",
                self.bind
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openai_spec() {
        let s = TeacherSpec::parse("openai:http://127.0.0.1:8000/v1/#Qwen/Qwen2.5-7B").unwrap();
        assert_eq!(s.identity(), "openai:http://127.0.0.1:8000/v1#Qwen/Qwen2.5-7B");
        assert!(TeacherSpec::parse("openai:http://x/v1").is_err());
        assert!(TeacherSpec::parse("openai:notaurl#m").is_err());
        assert!(TeacherSpec::parse("vllm:http://x#m").is_err());
    }

    #[test]
    fn non_loopback_needs_token() {
        let cli = Cli::parse_from(["server", "--bind", "0.0.0.0:8080"]);
        let err = Settings::from_cli(cli).unwrap_err().to_string();
        assert!(err.contains("--api-token"), "{err}");
        let cli = Cli::parse_from(["server", "--bind", "0.0.0.0:8080", "--api-token", "t"]);
        assert!(Settings::from_cli(cli).is_ok());
    }

    #[test]
    fn api_key_is_redacted_in_debug() {
        let mut t = Settings::teacher_defaults(
            "gpt",
            TeacherSpec::parse("openai:https://api.openai.com/v1#gpt-4o").unwrap(),
        );
        t.api_key = Some("sk-secret".into());
        assert!(!format!("{t:?}").contains("sk-secret"));
        assert_eq!(api_key_env_var("my-gpt"), "TEACHER_MY_GPT_API_KEY");
    }

    #[test]
    fn config_file_and_flags_merge() {
        let dir = std::env::temp_dir().join(format!("distill-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            "db = \"x.sqlite\"\nmax_in_flight = 4\n[teachers]\na = \"openai:http://h/v1#m\"\n[teachers.b]\nspec = \"openai:http://h2/v1#m2\"\nmax_in_flight = 2\n",
        )
        .unwrap();
        let cli = Cli::parse_from(["server", "--config", path.to_str().unwrap(), "--db", "y.sqlite"]);
        let s = Settings::from_cli(cli).unwrap();
        assert_eq!(s.db, PathBuf::from("y.sqlite"));
        let a = s.teachers.iter().find(|t| t.name == "a").unwrap();
        let b = s.teachers.iter().find(|t| t.name == "b").unwrap();
        assert_eq!((a.max_in_flight, b.max_in_flight), (4, 2));
        std::fs::write(&path, "bogus = 1\n").unwrap();
        let cli = Cli::parse_from(["server", "--config", path.to_str().unwrap()]);
        assert!(Settings::from_cli(cli).is_err());
    }

    #[test]
    fn local_engine_and_precision_per_teacher() {
        let dir = std::env::temp_dir().join(format!("distill-cfg-p-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "[teachers.a]\nspec = \"local:a.gguf\"\nprecision = \"f32\"\nengine = \"native\"\n").unwrap();
        let from = |args: &[&str]| {
            let mut all = vec!["server", "--config", path.to_str().unwrap(), "--teacher", "b=local:b.gguf"];
            all.extend_from_slice(args);
            Settings::from_cli(Cli::parse_from(all))
        };
        let s = from(&[]).unwrap();
        let t = |s: &Settings, n: &str| s.teachers.iter().find(|t| t.name == n).unwrap().clone();
        assert_eq!((t(&s, "a").local_precision, t(&s, "a").local_engine), (Precision::F32, LocalEngine::Native));
        assert_eq!((t(&s, "b").local_precision, t(&s, "b").local_engine), (Precision::Quantized, LocalEngine::Auto));
        let s = from(&["--local-precision", "b=f32", "--local-engine", "b=mistralrs"]).unwrap();
        assert_eq!((t(&s, "b").local_precision, t(&s, "b").local_engine), (Precision::F32, LocalEngine::Mistralrs));
        for (args, want) in [
            (&["--local-precision", "b=f16"][..], "precision `f16` is unknown; use quantized or f32"),
            (&["--local-precision", "b"][..], "--local-precision `b` must be NAME=VALUE, e.g. --local-precision smol=f32"),
            (&["--local-precision", "c=f32"][..], "--local-precision names teacher `c`, but no --teacher c=... is configured"),
            (&["--local-engine", "b=vllm"][..], "local engine `vllm` is unknown"),
        ] {
            let err = format!("{:#}", from(args).unwrap_err());
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }
}
