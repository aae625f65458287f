//! Evaluation on held-out teacher answers: token-averaged cross-entropy over answer tokens,
//! perplexity, and greedy agreement (the fraction of answer positions where the student's
//! argmax under teacher forcing is the teacher's token).

use candle_core::{Device, Tensor, D};

use crate::data::Batch;
use crate::model::{masked_cross_entropy, Llama};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    pub loss: f64,
    pub ppl: f64,
    pub greedy_agreement: f64,
    pub tokens: u64,
}

/// The tensors of a packed batch on `device`: input, targets, mask, positions, segments.
pub struct BatchTensors {
    pub input: Tensor,
    pub target: Tensor,
    pub mask: Tensor,
    pub positions: Tensor,
    pub segments: Tensor,
    /// The teacher's top-k ids [B, T, k] and log-probabilities, when the batch has soft labels.
    pub teacher: Option<(Tensor, Tensor)>,
}

impl BatchTensors {
    pub fn new(b: &Batch, device: &Device, dtype: candle_core::DType) -> candle_core::Result<Self> {
        let shape = (b.rows, b.len);
        Ok(BatchTensors {
            input: Tensor::from_slice(&b.input, shape, device)?,
            target: Tensor::from_slice(&b.target, shape, device)?,
            mask: Tensor::from_slice(&b.mask, shape, device)?.to_dtype(dtype)?,
            positions: Tensor::from_slice(&b.positions, shape, device)?,
            segments: Tensor::from_slice(&b.segments, shape, device)?,
            teacher: if b.k == 0 {
                None
            } else {
                let shape = (b.rows, b.len, b.k);
                Some((
                    Tensor::from_slice(&b.teacher_ids, shape, device)?,
                    Tensor::from_slice(&b.teacher_logprobs, shape, device)?.to_dtype(dtype)?,
                ))
            },
        })
    }
}

/// Evaluates `model` on `batches` (no gradient is kept).
pub fn evaluate(model: &Llama, batches: &[Batch]) -> anyhow::Result<EvalResult> {
    let (mut loss_sum, mut count, mut agree) = (0f64, 0f64, 0f64);
    for b in batches {
        let t = BatchTensors::new(b, model.device(), model.dtype())?;
        let logits = model.forward_no_grad(&t.input, &t.positions, &t.segments)?;
        let (loss, n) = masked_cross_entropy(&logits, &t.target, &t.mask)?;
        loss_sum += loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        count += n;
        let pred = logits.argmax(D::Minus1)?; // [B, T] u32
        let hit = pred.eq(&t.target)?.to_dtype(model.dtype())?;
        agree += (hit * &t.mask)?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    }
    if count == 0.0 {
        anyhow::bail!("the validation set has no answer tokens");
    }
    let loss = loss_sum / count;
    Ok(EvalResult { loss, ppl: loss.exp(), greedy_agreement: agree / count, tokens: count as u64 })
}
