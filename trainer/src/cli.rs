//! Command-line interface (the `--help` text is these doc comments).

use std::path::PathBuf;

use clap::{Args, Parser};

use crate::init::InitSpec;
use crate::kd::{KdConfig, Tail};

/// Fine-tune a student on the teacher answers a distill server recorded in SQLite.
///
/// Example: trainer --from-db gen.sqlite --init models/SmolLM2-135M-Instruct.Q4_1.gguf
///          --keep-layers 0,2,4,6,8,10,12,14,16,18,20,22,24,26,28 --max-steps 200 --out runs/student
///
/// Evaluation alone: trainer eval --from-db gen.sqlite --model DIR (see trainer eval --help).
#[derive(Debug, Parser)]
#[command(name = "trainer", version)]
pub struct TrainCli {
    #[command(flatten)]
    pub args: TrainArgs,
}

/// Evaluate a model (a trainer output folder, an HF folder or a GGUF) on the validation split:
/// loss, perplexity and greedy agreement with the teacher, printed as JSON.
#[derive(Debug, Parser)]
#[command(name = "trainer eval", bin_name = "trainer eval", version)]
pub struct EvalCli {
    #[command(flatten)]
    pub args: EvalArgs,
}

/// What the command line asks for: `trainer eval ...` or a training run.
pub enum Command {
    Train(TrainArgs),
    Eval(EvalArgs),
}

impl Command {
    pub fn parse() -> Self {
        let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
        if argv.get(1).is_some_and(|a| a == "eval") {
            argv.remove(1);
            Command::Eval(EvalCli::parse_from(argv).args)
        } else {
            Command::Train(TrainCli::parse_from(argv).args)
        }
    }
}

/// Which answers to use.
#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// The server's database (gen.sqlite).
    #[arg(long, value_name = "PATH", required = true)]
    pub from_db: PathBuf,
    /// Only answers of this job; repeatable (default: every job).
    #[arg(long = "job", value_name = "ID")]
    pub jobs: Vec<i64>,
    /// Also train on answers cut off by max_new_tokens (default: only answers that ended with a stop).
    #[arg(long)]
    pub include_truncated: bool,
    /// Fraction of prompts held out for validation, chosen by a hash of the prompt.
    #[arg(long, default_value_t = 0.05, value_name = "F")]
    pub val_fraction: f64,
    /// At least this many validation examples.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub min_val: usize,
    /// Longest training sequence (prompt + answer) in tokens; longer examples lose the end of their answer.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub max_len: usize,
    /// Tokenizer (GGUF file or HF folder) for a scratch model, or to override the init model's.
    #[arg(long, value_name = "PATH")]
    pub tokenizer: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Where the student starts: a GGUF file (dequantized to f32), an HF folder
    /// (config.json + *.safetensors + tokenizer.json) or scratch:CONFIG.json (random weights).
    #[arg(long, value_name = "SPEC", required = true)]
    pub init: InitSpec,
    /// Output folder: the trained model (HF layout), checkpoint/, metrics.jsonl, loss.png.
    #[arg(long, value_name = "DIR", required = true)]
    pub out: PathBuf,
    /// Keep only these decoder layers of the init model (e.g. 0,4,8,...): a smaller student
    /// that shares the teacher's tokenizer.
    #[arg(long, value_name = "I,J,...", value_delimiter = ',')]
    pub keep_layers: Option<Vec<usize>>,
    /// Optimizer steps to run (default: one epoch).
    #[arg(long, value_name = "N", conflicts_with = "epochs")]
    pub max_steps: Option<u64>,
    /// Passes over the training set.
    #[arg(long, value_name = "E")]
    pub epochs: Option<u64>,
    /// Peak learning rate (after warmup; cosine decay to 10 % of it).
    #[arg(long, default_value_t = 1e-4, value_name = "LR")]
    pub lr: f64,
    /// Tokens per micro-batch (rows of --max-len tokens, several examples packed per row).
    /// Memory grows with it: a 15-layer SmolLM2 student peaked at 11 GB RSS with 1,024 tokens
    /// (the autograd graph keeps every layer's attention and the vocabulary-wide logits).
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub batch_tokens: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub grad_accum: usize,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub warmup: u64,
    /// Evaluate every N steps (and at the start and the end).
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub eval_every: u64,
    /// Save a checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub save_every: u64,
    /// Seed for the data order and for scratch initialisation.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub seed: u64,
    /// Continue from OUT/checkpoint/ (same data and settings); the result equals an uninterrupted run.
    #[arg(long)]
    pub resume: bool,
    /// AdamW decoupled weight decay (not applied to norms).
    #[arg(long, default_value_t = 0.0, value_name = "W")]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value (0 = off).
    #[arg(long, default_value_t = 1.0, value_name = "N")]
    pub max_grad_norm: f64,
    /// Stop after this many steps of this invocation, checkpointing first (for tests of resume).
    #[arg(long, value_name = "N", hide = true)]
    pub stop_after: Option<u64>,
    #[command(flatten)]
    pub kd: KdArgs,
}

/// Knowledge distillation from the teacher's stored soft labels (jobs run with `logprobs`).
#[derive(Debug, Clone, Args)]
pub struct KdArgs {
    /// Train on L = (1-λ)·CE + λ·T²·KL(teacher ‖ student) + λ_Z·z_loss over the stored top-k
    /// (needs a student with the teacher's vocabulary; every answer must have soft labels).
    #[arg(long)]
    pub kd: bool,
    /// λ: weight of the KL term (0 = hard labels only, 1 = soft labels only).
    #[arg(long, default_value_t = 0.5, value_name = "λ", requires = "kd")]
    pub lambda: f64,
    /// T: temperature both distributions are softened with (the KL is scaled by T²).
    #[arg(long, default_value_t = 1.0, value_name = "T", requires = "kd")]
    pub temperature: f64,
    /// λ_Z: weight of the z-loss, logsumexp(logits)², which keeps logits from drifting.
    #[arg(long, default_value_t = 1e-4, value_name = "λ_Z", requires = "kd")]
    pub z_loss: f64,
    /// Mass outside the teacher's top-k: `bucket` (a (k+1)-th "rest" class on both sides) or
    /// `renorm` (both renormalised over the top-k).
    #[arg(long, default_value = "bucket", value_name = "RULE", requires = "kd")]
    pub tail: Tail,
}

impl KdArgs {
    /// The loss configuration, when `--kd` is on; refuses values outside their range.
    pub fn config(&self) -> anyhow::Result<Option<KdConfig>> {
        if !self.kd {
            return Ok(None);
        }
        if !(0.0..=1.0).contains(&self.lambda) {
            anyhow::bail!("--lambda {} is outside 0..=1", self.lambda);
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            anyhow::bail!("--temperature {} must be a positive number", self.temperature);
        }
        if !(self.z_loss >= 0.0 && self.z_loss.is_finite()) {
            anyhow::bail!("--z-loss {} must be zero or positive", self.z_loss);
        }
        Ok(Some(KdConfig { lambda: self.lambda, temperature: self.temperature, z_loss: self.z_loss, tail: self.tail }))
    }
}

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// The model to evaluate: a trainer output folder, an HF folder or a GGUF file.
    #[arg(long, value_name = "DIR", required = true)]
    pub model: InitSpec,
    /// Keep only these decoder layers (to evaluate a pruned, untrained student).
    #[arg(long, value_name = "I,J,...", value_delimiter = ',')]
    pub keep_layers: Option<Vec<usize>>,
    /// Tokens per evaluation batch.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub batch_tokens: usize,
}
