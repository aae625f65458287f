//! Fused CPU kernels with their own backward, for the two places where composed candle ops
//! keep several full-size intermediates alive until the backward pass: the attention softmax
//! (`[B, H, T, T]` per layer: scaled scores, masked scores, max-shifted, exp, sum, quotient)
//! and the cross-entropy over the vocabulary (`[B, T, V]`: shifted logits, exp, log-softmax).
//! Each fused op keeps only what its gradient needs (the softmax its output; the
//! cross-entropy nothing beyond the logits it reads) and makes one pass per row each way.
//!
//! f32 and f64 on the CPU; other devices and dtypes take the composed ops, which compute the
//! same function (tests compare both, and check the gradients by finite differences).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

/// Runs `f::<f32>` or `f::<f64>` by the storage's dtype.
macro_rules! by_dtype {
    ($s:expr, $f:ident ( $($arg:expr),* )) => {
        match $s {
            CpuStorage::F32(_) => $f::<f32>($($arg),*),
            CpuStorage::F64(_) => $f::<f64>($($arg),*),
            other => bail!("fused op: f32 or f64 only, got {:?}", other.dtype()),
        }
    };
}

/// Whether `t` can take the fused kernels.
fn fused(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// `softmax(scale · scores + bias)` over the last dim. `scores` [B, H, T, S]; `bias` [B, 1, T, S]
/// of the same dtype, 0 where attention is allowed and −∞ elsewhere (not differentiated).
/// A row with no allowed position gives zeros.
pub fn masked_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    if fused(scores) && bias.dtype() == scores.dtype() {
        scores.contiguous()?.apply_op2(&bias.contiguous()?, MaskedSoftmax { scale })
    } else {
        composed::masked_softmax(scores, bias, scale)
    }
}

/// `softmax(scale · q·kᵀ + bias)`: `q` [B, H, T, d], `k` [B, KV, S, d] with H a multiple of KV
/// (grouped-query attention: query head h uses KV head h / (H / KV), as HF's `repeat_kv`),
/// `bias` as in [`masked_softmax`]; → [B, H, T, S]. The KV heads are not repeated: the query
/// heads sharing one are multiplied as one [rep·T, d] block. The autograd graph keeps only q, k
/// (which the model keeps anyway) and the output; the [B, H, T, S] scores are freed as soon as
/// the softmax is taken. The backward: dS from the output, then dq = dS·k, dk = dSᵀ·q.
pub fn attention_probs(q: &Tensor, k: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (_, kv, s_len, _) = k.dims4()?;
    if h % kv != 0 {
        bail!("attention_probs: {h} query heads for {kv} KV heads");
    }
    if fused(q) && k.dtype() == q.dtype() && bias.dtype() == q.dtype() {
        // Not recorded: the op below stands for the product and the softmax together.
        let grouped = q.detach().contiguous()?.reshape((b, kv, (h / kv) * t, d))?;
        let scores = grouped.matmul(&k.detach().t()?)?.reshape((b, h, t, s_len))?;
        let op = AttentionProbs { scores: std::sync::Mutex::new(Some(scores)), bias: bias.contiguous()?, scale, kv };
        q.apply_op2(k, op)
    } else {
        masked_softmax(&q.matmul(&composed::repeat_kv(k, h / kv)?.t()?)?, bias, scale)
    }
}

/// `probs·v` for `probs` [B, H, T, S] and `v` [B, KV, S, d] without repeating the KV heads:
/// → [B, H, T, d]. Ordinary candle ops (views and one batched product).
pub fn attention_values(probs: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, t, s_len) = probs.dims4()?;
    let (_, kv, _, d) = v.dims4()?;
    probs.contiguous()?.reshape((b, kv, (h / kv) * t, s_len))?.matmul(v)?.reshape((b, h, t, d))
}

struct AttentionProbs {
    /// The product q·kᵀ, computed by candle's matmul before the op runs and taken (freed) by
    /// its forward.
    scores: std::sync::Mutex<Option<Tensor>>,
    bias: Tensor,
    scale: f64,
    kv: usize,
}

fn attention_probs_fwd<T: WithDType>(op: &AttentionProbs) -> Result<(CpuStorage, Shape)> {
    let scores = op.scores.lock().unwrap().take();
    let Some(scores) = scores else { bail!("attention_probs: forward run twice") };
    let (Some(x), Some(bias)) = (cpu_slice::<T>(&scores), cpu_slice::<T>(&op.bias)) else { bail!("attention_probs: CPU tensors of one dtype") };
    let y = softmax_rows(x.get(), scores.dims(), bias.get(), op.bias.dims(), op.scale)?;
    Ok((T::storage(y), scores.shape().clone()))
}

impl CustomOp2 for AttentionProbs {
    fn name(&self) -> &'static str {
        "attention-probs"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, _l1: &Layout, _s2: &CpuStorage, _l2: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s1, attention_probs_fwd(self))
    }
    fn bwd(&self, q: &Tensor, k: &Tensor, y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBwd { scale: self.scale })?;
        let (b, h, t, d) = q.dims4()?;
        let s_len = k.dim(2)?;
        let ds = ds.reshape((b, self.kv, (h / self.kv) * t, s_len))?;
        let dq = ds.matmul(&k.detach())?.reshape((b, h, t, d))?;
        let q = q.detach().contiguous()?.reshape((b, self.kv, (h / self.kv) * t, d))?;
        let dk = ds.t()?.matmul(&q)?;
        Ok((Some(dq), Some(dk)))
    }
}

/// Per-token cross-entropy `−log softmax(logits)[target] · mask`, [B, T], from `logits`
/// [B, T, V], `targets` [B, T] u32 (valid ids even where masked) and `mask` [B, T] (any float
/// dtype; a value weights its token).
pub fn masked_token_ce(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if fused(logits) {
        let targets = targets.flatten_all()?.to_vec1::<u32>()?;
        let mask = mask.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        logits.contiguous()?.apply_op1(MaskedCe { targets, mask })
    } else {
        composed::masked_token_ce(logits, targets, mask)
    }
}

/// The same functions from ordinary differentiable candle ops: the fallback off the CPU, and
/// the reference the tests hold the fused kernels to.
pub mod composed {
    use candle_core::{Result, Tensor, D};

    pub fn masked_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
        candle_nn::ops::softmax(&(scores * scale)?.broadcast_add(bias)?, D::Minus1)
    }

    /// HF's `repeat_kv`: [B, kv, T, d] → [B, kv·rep, T, d], each KV head repeated `rep`
    /// times consecutively.
    pub fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
        if rep == 1 {
            return Ok(x.clone());
        }
        let (b, kv, t, d) = x.dims4()?;
        x.unsqueeze(2)?.broadcast_as((b, kv, rep, t, d))?.reshape((b, kv * rep, t, d))
    }

    /// [B·T, n·d] → [B, n, T, d], then HF's `apply_rotary_pos_emb`.
    pub fn rope_heads(x: &Tensor, (b, t, n, d): (usize, usize, usize, usize), cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let x = x.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?;
        let half = d / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
    }

    pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
        g.silu()? * u
    }

    pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&inv)?.broadcast_mul(w)
    }

    pub fn masked_token_ce(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        let picked = logp.gather(&targets.unsqueeze(2)?.contiguous()?, 2)?.squeeze(2)?;
        picked.broadcast_mul(&mask.to_dtype(logits.dtype())?)?.neg()
    }
}

/// The contiguous values of a CPU f32/f64 storage, as `T`.
fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    let Some(v) = T::of(s) else { bail!("{what}: expected {:?}", T::DTYPE) };
    let Some((a, b)) = l.contiguous_offsets() else { bail!("{what}: must be contiguous") };
    Ok(&v[a..b])
}

/// The contiguous values of a CPU tensor of dtype `T`, borrowed from its storage (no copy).
pub(crate) struct CpuSlice<'a, T> {
    guard: std::sync::RwLockReadGuard<'a, candle_core::Storage>,
    range: (usize, usize),
    _t: std::marker::PhantomData<T>,
}

impl<T: WithDType> CpuSlice<'_, T> {
    pub(crate) fn get(&self) -> &[T] {
        let candle_core::Storage::Cpu(s) = &*self.guard else { unreachable!("checked in cpu_slice") };
        &T::of(s).expect("checked in cpu_slice")[self.range.0..self.range.1]
    }
}

/// `t`'s values if it is a contiguous CPU tensor of dtype `T`.
pub(crate) fn cpu_slice<T: WithDType>(t: &Tensor) -> Option<CpuSlice<'_, T>> {
    let (guard, layout) = t.storage_and_layout();
    let range = layout.contiguous_offsets()?;
    match &*guard {
        candle_core::Storage::Cpu(s) if T::of(s).is_some() => {}
        _ => return None,
    }
    Some(CpuSlice { guard, range, _t: std::marker::PhantomData })
}

/// f32 and f64, for kernels written once.
pub(crate) trait WithDType: Float + Send + Sync + 'static {
    const DTYPE: DType;
    fn of(s: &CpuStorage) -> Option<&[Self]>;
    fn storage(v: Vec<Self>) -> CpuStorage;
    fn tensor(v: Vec<Self>, shape: Shape) -> Result<Tensor>;
}

macro_rules! with_dtype {
    ($t:ty, $variant:ident) => {
        impl WithDType for $t {
            const DTYPE: DType = DType::$variant;
            fn of(s: &CpuStorage) -> Option<&[$t]> {
                if let CpuStorage::$variant(v) = s {
                    Some(v)
                } else {
                    None
                }
            }
            fn storage(v: Vec<$t>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
            fn tensor(v: Vec<$t>, shape: Shape) -> Result<Tensor> {
                Tensor::from_vec(v, shape, &Device::Cpu)
            }
        }
    };
}
with_dtype!(f32, F32);
with_dtype!(f64, F64);

/// Σ aᵢ·bᵢ with 8 independent partial sums, so the compiler can vectorise it (a plain fold is
/// one sequential chain of additions); the order is fixed, so results are deterministic.
fn dot<T: WithDType>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: T = ca.remainder().iter().zip(cb.remainder()).fold(T::zero(), |s, (x, y)| s + *x * *y);
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = acc[l] + x[l] * y[l];
        }
    }
    acc.iter().fold(tail, |s, v| s + *v)
}

/// max and log Σ exp(x − max) of a row (the sum accumulated in f64); max is −∞ for a row of −∞.
fn max_and_lse<T: WithDType>(row: &[T]) -> (T, T) {
    let max = row.iter().copied().fold(T::neg_infinity(), T::max);
    if max == T::neg_infinity() {
        return (max, T::neg_infinity());
    }
    let sum: f64 = row.iter().map(|v| (*v - max).exp().to_f64().unwrap()).sum();
    (max, T::from(sum.ln()).unwrap())
}

struct MaskedSoftmax {
    scale: f64,
}

fn softmax_fwd<T: WithDType>(scale: f64, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    let (x, bias) = (slice::<T>(s1, l1, "scores")?, slice::<T>(s2, l2, "bias")?);
    let y = softmax_rows(x, l1.dims(), bias, l2.dims(), scale)?;
    Ok((T::storage(y), l1.shape().clone()))
}

/// The rows of `softmax(scale · x + bias)`; x [B, H, T, S], bias [B, 1, T, S].
fn softmax_rows<T: WithDType>(x: &[T], dims: &[usize], bias: &[T], bias_dims: &[usize], scale: f64) -> Result<Vec<T>> {
    let &[b, h, t, n] = dims else { bail!("scores must be [B, H, T, S], got {dims:?}") };
    if bias_dims != [b, 1, t, n] {
        bail!("bias must be [{b}, 1, {t}, {n}], got {bias_dims:?}");
    }
    let scale = T::from(scale).unwrap();
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(n).enumerate().for_each(|(r, out)| {
        let (bi, ti) = (r / (h * t), r % t);
        let src = &x[r * n..(r + 1) * n];
        let m = &bias[(bi * t + ti) * n..(bi * t + ti + 1) * n];
        let mut max = T::neg_infinity();
        for (o, (a, c)) in out.iter_mut().zip(src.iter().zip(m)) {
            *o = *a * scale + *c;
            max = max.max(*o);
        }
        if max == T::neg_infinity() {
            out.iter_mut().for_each(|o| *o = T::zero());
            return;
        }
        // exp once per entry (masked ones are exactly 0), the sum in f64.
        let mut sum = 0f64;
        for o in out.iter_mut() {
            *o = if *o == T::neg_infinity() { T::zero() } else { (*o - max).exp() };
            sum += o.to_f64().unwrap();
        }
        let inv = T::from(1.0 / sum).unwrap();
        out.iter_mut().for_each(|o| *o = *o * inv);
    });
    Ok(y)
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s1, softmax_fwd(self.scale, s1, l1, s2, l2))
    }
    /// d scores = scale · y ⊙ (g − Σ g ⊙ y), from the output alone.
    fn bwd(&self, _scores: &Tensor, _bias: &Tensor, y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBwd { scale: self.scale })?;
        Ok((Some(d), None))
    }
}

struct SoftmaxBwd {
    scale: f64,
}

fn softmax_bwd<T: WithDType>(scale: f64, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    let (y, g) = (slice::<T>(s1, l1, "softmax output")?, slice::<T>(s2, l2, "gradient")?);
    let n = *l1.dims().last().unwrap();
    let scale = T::from(scale).unwrap();
    let mut dx = vec![T::zero(); y.len()];
    dx.par_chunks_mut(n).enumerate().for_each(|(r, out)| {
        let (yr, gr) = (&y[r * n..(r + 1) * n], &g[r * n..(r + 1) * n]);
        let dot = dot(yr, gr);
        for (o, (a, b)) in out.iter_mut().zip(yr.iter().zip(gr)) {
            *o = scale * *a * (*b - dot);
        }
    });
    Ok((T::storage(dx), l1.shape().clone()))
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "masked-softmax-bwd"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s1, softmax_bwd(self.scale, s1, l1, s2, l2))
    }
}

struct MaskedCe {
    targets: Vec<u32>,
    mask: Vec<f64>,
}

impl MaskedCe {
    fn check(&self, dims: &[usize]) -> Result<(usize, usize)> {
        let &[b, t, v] = dims else { bail!("logits must be [B, T, V], got {dims:?}") };
        if self.targets.len() != b * t || self.mask.len() != b * t {
            bail!("targets and mask must be [{b}, {t}]");
        }
        if let Some(bad) = self.targets.iter().find(|&&id| id as usize >= v) {
            bail!("target id {bad} is outside the vocabulary of {v}");
        }
        Ok((b * t, v))
    }
}

fn ce_fwd<T: WithDType>(op: &MaskedCe, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(s, l, "logits")?;
    let (rows, v) = op.check(l.dims())?;
    let mut out = vec![T::zero(); rows];
    out.par_iter_mut().enumerate().for_each(|(r, o)| {
        let w = op.mask[r];
        if w != 0.0 {
            let row = &x[r * v..(r + 1) * v];
            let (max, lse) = max_and_lse(row);
            *o = (max + lse - row[op.targets[r] as usize]) * T::from(w).unwrap();
        }
    });
    Ok((T::storage(out), Shape::from(&l.dims()[..2])))
}

impl CustomOp1 for MaskedCe {
    fn name(&self) -> &'static str {
        "masked-ce"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s, ce_fwd(self, s, l))
    }
    /// d logits = g · mask · (softmax(logits) − onehot(target)), recomputed row by row.
    fn bwd(&self, logits: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let bwd = MaskedCeBwd { targets: self.targets.clone(), mask: self.mask.clone() };
        Ok(Some(logits.apply_op2_no_bwd(&grad.contiguous()?, &bwd)?))
    }
}

struct MaskedCeBwd {
    targets: Vec<u32>,
    mask: Vec<f64>,
}

fn ce_bwd<T: WithDType>(op: &MaskedCeBwd, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    let (x, g) = (slice::<T>(s1, l1, "logits")?, slice::<T>(s2, l2, "gradient")?);
    let v = *l1.dims().last().unwrap();
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(v).enumerate().for_each(|(r, out)| {
        let w = g[r] * T::from(op.mask[r]).unwrap();
        if w == T::zero() {
            return;
        }
        let row = &x[r * v..(r + 1) * v];
        // One exp per entry: e = exp(x − max), then scaled by w / Σe.
        let max = row.iter().copied().fold(T::neg_infinity(), T::max);
        let mut sum = 0f64;
        for (o, a) in out.iter_mut().zip(row) {
            *o = (*a - max).exp();
            sum += o.to_f64().unwrap();
        }
        let k = w * T::from(1.0 / sum).unwrap();
        out.iter_mut().for_each(|o| *o = *o * k);
        out[op.targets[r] as usize] = out[op.targets[r] as usize] - w;
    });
    Ok((T::storage(dx), l1.shape().clone()))
}

impl CustomOp2 for MaskedCeBwd {
    fn name(&self) -> &'static str {
        "masked-ce-bwd"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s1, ce_bwd(self, s1, l1, s2, l2))
    }
}

/// Splits projections into heads and applies RoPE in one pass: `x` [B·T, n·d] (a q or k
/// projection) → [B, n, T, d], rotated HF style (`x·cos + rotate_half(x)·sin`, with
/// rotate_half(x) = [−x₂, x₁]); `cos`/`sin` [B, 1, T, d] hold the same angle in both halves.
/// The composed version (reshape, transpose, copy, two narrows, neg, cat, two products, sum)
/// keeps six copies of the tensor for the backward; this keeps none beyond its input. The
/// backward is the inverse rotation, also fused.
pub fn rope_heads(x: &Tensor, (b, t, n, d): (usize, usize, usize, usize), cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused(x) && cos.dtype() == x.dtype() && sin.dtype() == x.dtype() && d % 2 == 0 {
        let op = RopeHeads { dims: (b, t, n, d), cos: cos.contiguous()?, sin: sin.contiguous()? };
        x.contiguous()?.apply_op1(op)
    } else {
        composed::rope_heads(x, (b, t, n, d), cos, sin)
    }
}

struct RopeHeads {
    dims: (usize, usize, usize, usize),
    cos: Tensor,
    sin: Tensor,
}

/// Rotates `src` (one head's d values at one position) into `dst`; `sign` −1 for the inverse.
#[inline]
fn rotate<T: WithDType>(src: &[T], cos: &[T], sin: &[T], sign: T, dst: &mut [T]) {
    let half = src.len() / 2;
    for i in 0..half {
        let (a, c) = (src[i], src[i + half]);
        dst[i] = a * cos[i] - sign * c * sin[i];
        dst[i + half] = c * cos[i + half] + sign * a * sin[i + half];
    }
}

fn rope_fwd<T: WithDType>(op: &RopeHeads, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let (b, t, n, d) = op.dims;
    let x = slice::<T>(s, l, "projection")?;
    if l.dims() != [b * t, n * d] {
        bail!("rope_heads: input must be [{}, {}], got {:?}", b * t, n * d, l.dims());
    }
    let (Some(cos), Some(sin)) = (cpu_slice::<T>(&op.cos), cpu_slice::<T>(&op.sin)) else { bail!("rope_heads: cos/sin must be CPU tensors of the input's dtype") };
    let (cos, sin) = (cos.get(), sin.get());
    if cos.len() != b * t * d || sin.len() != b * t * d {
        bail!("rope_heads: cos/sin must be [{b}, 1, {t}, {d}]");
    }
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(d).enumerate().for_each(|(o, dst)| {
        let (bi, h, ti) = (o / (n * t), (o / t) % n, o % t);
        let row = bi * t + ti;
        let src = &x[row * n * d + h * d..row * n * d + (h + 1) * d];
        rotate(src, &cos[row * d..(row + 1) * d], &sin[row * d..(row + 1) * d], T::one(), dst);
    });
    Ok((T::storage(out), Shape::from((b, n, t, d))))
}

impl CustomOp1 for RopeHeads {
    fn name(&self) -> &'static str {
        "rope-heads"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s, rope_fwd(self, s, l))
    }
    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = RopeHeadsBwd { dims: self.dims, cos: self.cos.clone(), sin: self.sin.clone() };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// [B, n, T, d] gradient → [B·T, n·d]: rotated back (the rotation's transpose is its inverse).
struct RopeHeadsBwd {
    dims: (usize, usize, usize, usize),
    cos: Tensor,
    sin: Tensor,
}

fn rope_bwd<T: WithDType>(op: &RopeHeadsBwd, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let (b, t, n, d) = op.dims;
    let g = slice::<T>(s, l, "gradient")?;
    let (Some(cos), Some(sin)) = (cpu_slice::<T>(&op.cos), cpu_slice::<T>(&op.sin)) else { bail!("rope_heads: cos/sin dtype") };
    let (cos, sin) = (cos.get(), sin.get());
    let mut dx = vec![T::zero(); g.len()];
    dx.par_chunks_mut(n * d).enumerate().for_each(|(row, dst)| {
        let (bi, ti) = (row / t, row % t);
        for h in 0..n {
            let src = &g[((bi * n + h) * t + ti) * d..((bi * n + h) * t + ti + 1) * d];
            rotate(src, &cos[row * d..(row + 1) * d], &sin[row * d..(row + 1) * d], -T::one(), &mut dst[h * d..(h + 1) * d]);
        }
    });
    Ok((T::storage(dx), Shape::from((b * t, n * d))))
}

impl CustomOp1 for RopeHeadsBwd {
    fn name(&self) -> &'static str {
        "rope-heads-bwd"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s, rope_bwd(self, s, l))
    }
}

/// SwiGLU's gate: `silu(g) ⊙ u`, one pass each way (composed: sigmoid, product, product, kept
/// for the backward). `g`, `u` [N, F].
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if fused(g) && u.dtype() == g.dtype() && g.dims() == u.dims() {
        g.contiguous()?.apply_op2(&u.contiguous()?, SiluMul)
    } else {
        composed::silu_mul(g, u)
    }
}

struct SiluMul;

fn sigmoid<T: WithDType>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

fn silu_mul_fwd<T: WithDType>(s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    let (g, u) = (slice::<T>(s1, l1, "gate")?, slice::<T>(s2, l2, "up")?);
    let mut y = vec![T::zero(); g.len()];
    y.par_chunks_mut(1 << 14).enumerate().for_each(|(c, out)| {
        let lo = c << 14;
        for (i, o) in out.iter_mut().enumerate() {
            let a = g[lo + i];
            *o = a * sigmoid(a) * u[lo + i];
        }
    });
    Ok((T::storage(y), l1.shape().clone()))
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s1, silu_mul_fwd(s1, l1, s2, l2))
    }
    /// dg = grad ⊙ u ⊙ σ(g)(1 + g(1 − σ(g))), du = grad ⊙ silu(g).
    fn bwd(&self, g: &Tensor, u: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = Tensor::stack(&[g, u], 0)?.apply_op2_no_bwd(&grad.contiguous()?, &SiluMulBwd)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// Input [2, N, F] = (g, u) stacked, and the gradient [N, F]; output [2, N, F] = (dg, du).
struct SiluMulBwd;

fn silu_mul_bwd<T: WithDType>(s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    let (gu, gr) = (slice::<T>(s1, l1, "gate and up")?, slice::<T>(s2, l2, "gradient")?);
    let n = gr.len();
    let (g, u) = gu.split_at(n);
    let mut out = vec![T::zero(); 2 * n];
    let (dg, du) = out.split_at_mut(n);
    dg.par_chunks_mut(1 << 14).zip(du.par_chunks_mut(1 << 14)).enumerate().for_each(|(c, (dg, du))| {
        let lo = c << 14;
        for i in 0..dg.len() {
            let (a, b, y) = (g[lo + i], u[lo + i], gr[lo + i]);
            let s = sigmoid(a);
            dg[i] = y * b * s * (T::one() + a * (T::one() - s));
            du[i] = y * a * s;
        }
    });
    Ok((T::storage(out), l1.shape().clone()))
}

impl CustomOp2 for SiluMulBwd {
    fn name(&self) -> &'static str {
        "silu-mul-bwd"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s1, silu_mul_bwd(s1, l1, s2, l2))
    }
}

/// HF LlamaRMSNorm `x / sqrt(mean(x²) + eps) · w` over the last dim, one pass each way
/// (composed: square, mean, add, sqrt, reciprocal, two products). `x` [N, H], `w` [H].
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if fused(x) && w.dtype() == x.dtype() && x.rank() == 2 && w.dims() == [x.dim(1)?] {
        x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
    } else {
        composed::rms_norm(x, w, eps)
    }
}

struct RmsNorm {
    eps: f64,
}

/// 1 / sqrt(mean(row²) + eps), accumulated in f64.
fn inv_rms<T: WithDType>(row: &[T], eps: f64) -> T {
    let ms = row.iter().map(|v| v.to_f64().unwrap().powi(2)).sum::<f64>() / row.len() as f64;
    T::from(1.0 / (ms + eps).sqrt()).unwrap()
}

fn rms_norm_fwd<T: WithDType>(eps: f64, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    let (x, w) = (slice::<T>(s1, l1, "input")?, slice::<T>(s2, l2, "weight")?);
    let h = w.len();
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(h).enumerate().for_each(|(r, out)| {
        let row = &x[r * h..(r + 1) * h];
        let inv = inv_rms(row, eps);
        for ((o, a), b) in out.iter_mut().zip(row).zip(w) {
            *o = *a * inv * *b;
        }
    });
    Ok((T::storage(y), l1.shape().clone()))
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s1, rms_norm_fwd(self.eps, s1, l1, s2, l2))
    }
    /// With r = 1/rms(x) and gw = grad ⊙ w: dx = r·gw − x·r³·mean(gw ⊙ x); dw = Σ_rows grad ⊙ x·r.
    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op2_no_bwd(&grad.contiguous()?, &RmsNormBwdX { eps: self.eps, w: w.clone() })?;
        let h = x.dim(1)?;
        // dw: per-row r computed again, the column sums by candle.
        let normed = x.apply_op2_no_bwd(&Tensor::ones(h, x.dtype(), x.device())?, &RmsNorm { eps: self.eps })?;
        let dw = (normed * grad)?.sum(0)?;
        Ok((Some(dx), Some(dw)))
    }
}

struct RmsNormBwdX {
    eps: f64,
    w: Tensor,
}

fn rms_norm_bwd_x<T: WithDType>(op: &RmsNormBwdX, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    let (x, g) = (slice::<T>(s1, l1, "input")?, slice::<T>(s2, l2, "gradient")?);
    let Some(w) = cpu_slice::<T>(&op.w) else { bail!("rms_norm: weight dtype") };
    let w = w.get();
    let h = w.len();
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(h).enumerate().for_each(|(r, out)| {
        let (row, gr) = (&x[r * h..(r + 1) * h], &g[r * h..(r + 1) * h]);
        let inv = inv_rms(row, op.eps);
        let dot = row.iter().zip(gr).zip(w).map(|((a, b), c)| (*a * *b * *c).to_f64().unwrap()).sum::<f64>() / h as f64;
        let k = T::from(dot).unwrap() * inv * inv * inv;
        for (((o, a), b), c) in out.iter_mut().zip(row).zip(gr).zip(w) {
            *o = inv * *b * *c - *a * k;
        }
    });
    Ok((T::storage(dx), l1.shape().clone()))
}

impl CustomOp2 for RmsNormBwdX {
    fn name(&self) -> &'static str {
        "rms-norm-bwd"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s1, rms_norm_bwd_x(self, s1, l1, s2, l2))
    }
}
