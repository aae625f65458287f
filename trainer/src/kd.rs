//! The knowledge-distillation loss over stored top-k soft labels:
//!
//! ```text
//! L = (1 − λ)·CE(answer tokens) + λ·T²·KL(p_T ‖ q_T) + λ_Z·z_loss
//! ```
//!
//! per answer position, where the teacher is known only through its top-k (id, log-probability)
//! pairs at temperature 1. The mass outside the top-k follows one of two rules:
//!
//! - `Tail::Bucket`: a (k+1)-th "rest" class on both sides. Teacher: rest = 1 − Σ top-k
//!   probabilities (0 if rounding makes it negative). Student: the exact mass of every other
//!   vocabulary entry, `logsumexp(z_rest) − logsumexp(z)`. Both (k+1)-class distributions are
//!   then tempered as distributions over those k+1 classes (p_T ∝ p^(1/T)), so the bucket counts
//!   as one class.
//! - `Tail::Renorm`: both sides renormalised over the teacher's top-k ids, then tempered.
//!
//! KL terms with zero teacher probability are 0 (not NaN); −∞ log-probabilities, zero tail mass
//! and f16-rounded inputs are all finite here. A position whose teacher pairs are all −∞ has no
//! soft label (e.g. an end-of-turn token a server did not report): it gets no KL term, only the
//! cross-entropy and z-loss. `z_loss` is `logsumexp(z)²` (PaLM), which keeps
//! the student's logits from drifting. Every term is averaged over the positions' mask weights
//! by the caller, like the cross-entropy: this returns sums and leaves the division to the step.
//!
//! The loss is composed of differentiable candle ops, checked against a float64 reference
//! (value and gradient) in `trainer/tests/kd.rs`.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor, D};

/// How the teacher's probability mass outside its top-k is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    Bucket,
    Renorm,
}

impl std::str::FromStr for Tail {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bucket" => Ok(Tail::Bucket),
            "renorm" => Ok(Tail::Renorm),
            other => anyhow::bail!("--tail `{other}`: use bucket or renorm"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KdConfig {
    /// λ: weight of the KL term; 1 − λ goes to the cross-entropy on the answer tokens.
    pub lambda: f64,
    pub temperature: f64,
    /// λ_Z: weight of the z-loss.
    pub z_loss: f64,
    pub tail: Tail,
}

/// The summed terms over the masked positions (each weighted by its mask value).
pub struct KdTerms {
    pub ce: Tensor,
    pub kl: Tensor,
    pub z: Tensor,
    /// (1 − λ)·ce + λ·T²·kl + λ_Z·z
    pub total: Tensor,
}

/// `log(exp(a) − exp(b))` for a ≥ b elementwise, as `a + log1p(−exp(b − a))`; −∞ where equal.
fn log_sub_exp(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let d = (b - a)?.exp()?; // in [0, 1]
    // log1p(−d) = log(1 − d); clamp 1 − d away from 0 so the gradient stays finite.
    let one_minus = d.affine(-1.0, 1.0)?.clamp(1e-30, 1.0)?;
    Ok((a + one_minus.log()?)?)
}

/// `Σ_c p_c (log p_c − log q_c)` over the last dim, with 0 where p_c = 0.
fn kl(log_p: &Tensor, log_q: &Tensor) -> Result<Tensor> {
    let p = log_p.exp()?;
    let zero = p.zeros_like()?;
    let pos = p.gt(0.0)?;
    // Where p = 0 use 0 for both logs, so neither −∞ nor NaN enters the product or its gradient.
    let lp = pos.where_cond(log_p, &zero)?;
    let lq = pos.where_cond(log_q, &zero)?;
    Ok((p * (lp - lq)?)?.sum(D::Minus1)?)
}

/// Tempers a distribution given by log-probabilities over the last dim: log softmax(log p / T).
fn temper(log_p: &Tensor, t: f64) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(&(log_p / t)?, D::Minus1)?)
}

/// The KD loss terms for student `logits` [B, T, V], answer `targets` [B, T], teacher top-k
/// `teacher_ids` [B, T, K] (u32) and `teacher_logprobs` [B, T, K] (natural log, temperature 1,
/// may hold −∞), `mask` [B, T] (0 where a position is not trained).
pub fn kd_loss(
    logits: &Tensor,
    targets: &Tensor,
    teacher_ids: &Tensor,
    teacher_logprobs: &Tensor,
    mask: &Tensor,
    cfg: &KdConfig,
) -> Result<KdTerms> {
    let (b, t, _v) = logits.dims3()?;
    let (_, _, k) = teacher_ids.dims3()?;
    ensure!(teacher_logprobs.dims() == [b, t, k], "teacher log-probabilities must be [{b}, {t}, {k}]");
    ensure!(cfg.temperature > 0.0, "--temperature must be positive");
    let dt = if logits.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    let z = logits.to_dtype(dt)?;
    let mask = mask.to_dtype(dt)?;
    // Teacher log-probs: −∞ kept, but bounded below so that arithmetic on them stays finite.
    let tlp = teacher_logprobs.to_dtype(dt)?.clamp(-1e4, 0.0)?;
    let ids = teacher_ids.contiguous()?;

    let lse = z.log_sum_exp(D::Minus1)?; // [B, T]
    let ce = {
        let picked = z.gather(&targets.unsqueeze(2)?.contiguous()?, 2)?.squeeze(2)?;
        ((lse.clone() - picked)? * &mask)?.sum_all()?
    };
    let zl = (lse.sqr()? * &mask)?.sum_all()?;

    let zk = z.gather(&ids, 2)?; // student logits at the teacher's ids, [B, T, K]
    let (log_p, log_q) = match cfg.tail {
        Tail::Renorm => {
            let lp = candle_nn::ops::log_softmax(&tlp, D::Minus1)?;
            let lq = candle_nn::ops::log_softmax(&zk, D::Minus1)?;
            (lp, lq)
        }
        Tail::Bucket => {
            // Teacher: log(rest) = log(1 − Σ p_k), −∞-safe.
            let top_mass = tlp.log_sum_exp(D::Minus1)?.clamp(-1e4, 0.0)?.unsqueeze(2)?;
            let teacher_rest = log_sub_exp(&top_mass.zeros_like()?, &top_mass)?;
            let lp = Tensor::cat(&[&tlp, &teacher_rest], 2)?;
            // Student: log q_k and the log of the rest of the vocabulary's mass.
            let lqk = zk.broadcast_sub(&lse.unsqueeze(2)?)?;
            let q_top = lqk.log_sum_exp(D::Minus1)?.unsqueeze(2)?.clamp(-1e4, 0.0)?;
            let student_rest = log_sub_exp(&q_top.zeros_like()?, &q_top)?;
            let lq = Tensor::cat(&[&lqk, &student_rest], 2)?;
            (lp, lq)
        }
    };
    let (log_p, log_q) = if cfg.temperature == 1.0 {
        (log_p, log_q)
    } else {
        (temper(&log_p, cfg.temperature)?, temper(&log_q, cfg.temperature)?)
    };
    // Positions without soft labels (every pair −∞, clamped to −1e4 above) carry no KL.
    let labelled = tlp.max(D::Minus1)?.gt(-1e3)?.to_dtype(dt)?;
    let kl = ((kl(&log_p, &log_q)? * &mask)? * labelled)?.sum_all()?;
    let total = ((ce.affine(1.0 - cfg.lambda, 0.0)? + kl.affine(cfg.lambda * cfg.temperature * cfg.temperature, 0.0)?)?
        + zl.affine(cfg.z_loss, 0.0)?)?;
    Ok(KdTerms { ce, kl, z: zl, total })
}
