//! AdamW with state we can save and restore (candle-nn's `AdamW` keeps its moments private,
//! so a run could not resume), gradient clipping and accumulation helpers, and the learning
//! rate schedule.
//!
//! The update is PyTorch's `torch.optim.AdamW` (decoupled weight decay, bias correction):
//! ```text
//! p ← p·(1 − lr·wd)                       (matrices only; 1-D params — norms, biases — are not decayed)
//! m ← β₁·m + (1 − β₁)·g
//! v ← β₂·v + (1 − β₂)·g²
//! p ← p − lr/(1 − β₁ᵗ) · m / (sqrt(v/(1 − β₂ᵗ)) + ε)
//! ```
//! Moments are kept in f32 (f64 for f64 parameters) whatever the parameter dtype. Resuming from
//! [`AdamW::state_tensors`] (or [`AdamW::save`]) continues bit-identically, because the update
//! depends only on the step count, the moments and the parameters.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;

use crate::ops::{cpu_slice, WithDType};

/// The fraction of the peak learning rate that the cosine schedule decays to.
pub const LR_FLOOR_FRACTION: f64 = 0.1;

/// Learning rate for the update with 0-based index `step`: linear warmup over the first
/// `warmup` updates (update `warmup − 1` runs at `base_lr`, update 0 at `base_lr / warmup`), then
/// a half cosine from `base_lr` down to `LR_FLOOR_FRACTION · base_lr`, reached at the last update
/// (`total_steps − 1`) and held after it. The floor keeps late steps useful, as in the
/// distillation-scaling-law recipe, instead of wasting them at lr ≈ 0.
pub fn lr_at(step: u64, base_lr: f64, warmup: u64, total_steps: u64) -> f64 {
    let s = step + 1; // updates done once this one is applied
    if s <= warmup {
        return base_lr * s as f64 / warmup as f64;
    }
    let decay = total_steps.saturating_sub(warmup);
    if decay == 0 {
        return base_lr;
    }
    let progress = ((s - warmup) as f64 / decay as f64).min(1.0);
    let floor = LR_FLOOR_FRACTION * base_lr;
    floor + (base_lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// The dtype moments and norms are computed in: f64 for f64, else f32.
fn acc_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

fn grad_of<'a>(grads: &'a GradStore, name: &str, var: &Var) -> Result<&'a Tensor> {
    grads.get(var.as_tensor()).with_context(|| format!("no gradient for `{name}` (the loss does not depend on it: is the graph cut?)"))
}

/// Scales the gradients of `params` so that their global L2 norm is at most `max_norm`, and
/// returns the norm before clipping. A non-finite norm is returned as is and nothing is
/// scaled: the caller should skip that update. A missing gradient is an error.
pub fn clip_grad_norm(grads: &mut GradStore, params: &[(String, Var)], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads, params)?;
    if norm.is_finite() && norm > max_norm {
        scale_grads(grads, params, max_norm / norm)?;
    }
    Ok(norm)
}

/// Global L2 norm of the gradients of `params` (summed on the device, one transfer).
pub fn grad_norm(grads: &GradStore, params: &[(String, Var)]) -> Result<f64> {
    let mut total: Option<Tensor> = None;
    for (name, var) in params {
        let g = grad_of(grads, name, var)?;
        let sq = g.to_dtype(acc_dtype(g.dtype()))?.sqr()?.sum_all()?.to_dtype(DType::F64)?;
        total = Some(match total {
            None => sq,
            Some(t) => (t + sq)?,
        });
    }
    Ok(total.map(|t| t.to_scalar::<f64>()).transpose()?.unwrap_or(0.0).sqrt())
}

/// Multiplies the gradients of `params` by `factor` (e.g. 1 / tokens of an accumulated step).
pub fn scale_grads(grads: &mut GradStore, params: &[(String, Var)], factor: f64) -> Result<()> {
    for (name, var) in params {
        let g = (grad_of(grads, name, var)? * factor)?;
        grads.insert(var.as_tensor(), g);
    }
    Ok(())
}

/// Gradient accumulation over micro-batches: the first store is kept, later ones are added
/// into it parameter by parameter.
pub fn accumulate_grads(acc: &mut Option<GradStore>, new: GradStore, params: &[(String, Var)]) -> Result<()> {
    let Some(acc) = acc else {
        *acc = Some(new);
        return Ok(());
    };
    for (name, var) in params {
        let sum = (grad_of(acc, name, var)? + grad_of(&new, name, var)?)?;
        acc.insert(var.as_tensor(), sum);
    }
    Ok(())
}

/// AdamW hyper-parameters (the learning rate is passed to each [`AdamW::step`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled decay, applied only to parameters with 2 or more dims.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's AdamW defaults.
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// The per-update constants of the AdamW formula.
struct Coeffs {
    b1: f64,
    b2: f64,
    eps: f64,
    /// lr / (1 − β₁ᵗ)
    step_size: f64,
    /// 1 / (1 − β₂ᵗ)
    inv_bc2: f64,
}

/// The update from candle tensor ops (any device): returns the new (parameter, m, v).
fn composed_update(var: &Var, g: &Tensor, m: Option<&Tensor>, v: Option<&Tensor>, decay: f64, k: &Coeffs) -> Result<(Tensor, Tensor, Tensor)> {
    let m = match m {
        Some(m) => m.affine(k.b1, 0.0)?,
        None => g.zeros_like()?,
    };
    let v = match v {
        Some(v) => v.affine(k.b2, 0.0)?,
        None => g.zeros_like()?,
    };
    let m = (m + g.affine(1.0 - k.b1, 0.0)?)?;
    let v = (v + g.sqr()?.affine(1.0 - k.b2, 0.0)?)?;
    let mut p = var.as_detached_tensor().to_dtype(g.dtype())?;
    if decay != 1.0 {
        p = p.affine(decay, 0.0)?;
    }
    let denom = (v.affine(k.inv_bc2, 0.0)?.sqrt()? + k.eps)?;
    let p = (p - (m.affine(k.step_size, 0.0)? / denom)?)?;
    Ok((p, m, v))
}

/// The same update in one pass over contiguous CPU f32/f64 buffers (the composed ops make a
/// dozen passes and temporaries per parameter); `None` where it does not apply.
fn fused_update(p: &Tensor, g: &Tensor, m: Option<&Tensor>, v: Option<&Tensor>, decay: f64, k: &Coeffs) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    if !matches!(p.device(), Device::Cpu) || p.dtype() != g.dtype() {
        return Ok(None);
    }
    let out = match p.dtype() {
        DType::F32 => fused_update_t::<f32>(p, g, m, v, decay, k)?,
        DType::F64 => fused_update_t::<f64>(p, g, m, v, decay, k)?,
        _ => None,
    };
    Ok(out)
}

fn fused_update_t<T: WithDType>(p: &Tensor, g: &Tensor, m: Option<&Tensor>, v: Option<&Tensor>, decay: f64, k: &Coeffs) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let n = p.elem_count();
    let (np, nm, nv) = {
        let (Some(ps), Some(gs)) = (cpu_slice::<T>(p), cpu_slice::<T>(g)) else { return Ok(None) };
        let (ms, vs) = match (m.map(cpu_slice::<T>), v.map(cpu_slice::<T>)) {
            (Some(Some(m)), Some(Some(v))) => (Some(m), Some(v)),
            (None, None) => (None, None),
            _ => return Ok(None),
        };
        let (ps, gs) = (ps.get(), gs.get());
        let (ms, vs) = (ms.as_ref().map(|x| x.get()), vs.as_ref().map(|x| x.get()));
        let c = |x: f64| T::from(x).unwrap();
        let (b1, b2, ob1, ob2, eps, step, ibc2, decay) =
            (c(k.b1), c(k.b2), c(1.0 - k.b1), c(1.0 - k.b2), c(k.eps), c(k.step_size), c(k.inv_bc2), c(decay));
        let (mut np, mut nm, mut nv) = (vec![T::zero(); n], vec![T::zero(); n], vec![T::zero(); n]);
        const CHUNK: usize = 1 << 14;
        np.par_chunks_mut(CHUNK).zip(nm.par_chunks_mut(CHUNK)).zip(nv.par_chunks_mut(CHUNK)).enumerate().for_each(
            |(ci, ((op, om), ov))| {
                let lo = ci * CHUNK;
                for i in 0..op.len() {
                    let j = lo + i;
                    let gi = gs[j];
                    let (m0, v0) = match (&ms, &vs) {
                        (Some(m), Some(v)) => (m[j] * b1, v[j] * b2),
                        _ => (T::zero(), T::zero()),
                    };
                    let mi = m0 + gi * ob1;
                    let vi = v0 + gi * gi * ob2;
                    let mut pi = ps[j];
                    if decay != T::one() {
                        pi = pi * decay;
                    }
                    op[i] = pi - (mi * step) / ((vi * ibc2).sqrt() + eps);
                    om[i] = mi;
                    ov[i] = vi;
                }
            },
        );
        (np, nm, nv)
    };
    let shape = p.shape().clone();
    let t = |v: Vec<T>| T::tensor(v, shape.clone());
    Ok(Some((t(np)?, t(nm)?, t(nv)?)))
}

const STEP_KEY: &str = "adamw.step";
const M_PREFIX: &str = "adamw.m.";
const V_PREFIX: &str = "adamw.v.";

/// AdamW whose state (update count, first and second moments per parameter name) is public
/// through [`AdamW::state_tensors`] / [`AdamW::from_state_tensors`].
pub struct AdamW {
    cfg: AdamWConfig,
    steps_done: u64,
    m: BTreeMap<String, Tensor>,
    v: BTreeMap<String, Tensor>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> Self {
        Self { cfg, steps_done: 0, m: BTreeMap::new(), v: BTreeMap::new() }
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Updates applied so far (the `t` of bias correction for the next one is this + 1).
    pub fn steps_done(&self) -> u64 {
        self.steps_done
    }

    /// One update of every parameter in `params` from `grads`, at learning rate `lr`. Every
    /// parameter must have a gradient (checked before anything changes): pass only the
    /// parameters being trained.
    pub fn step(&mut self, params: &[(String, Var)], grads: &GradStore, lr: f64) -> Result<()> {
        for (name, var) in params {
            grad_of(grads, name, var)?;
        }
        let AdamWConfig { beta1: b1, beta2: b2, eps, weight_decay: wd } = self.cfg;
        let t = (self.steps_done + 1) as i32;
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        let k = Coeffs { b1, b2, eps, step_size: lr / bc1, inv_bc2: 1.0 / bc2 };
        for (name, var) in params {
            let dt = acc_dtype(var.dtype());
            let g = grad_of(grads, name, var)?.to_dtype(dt)?;
            let decay = if var.rank() >= 2 { 1.0 - lr * wd } else { 1.0 };
            let (m, v) = (self.m.get(name), self.v.get(name));
            let (p, m, v) = match fused_update(var.as_tensor(), &g, m, v, decay, &k)? {
                Some(new) => new,
                None => composed_update(var, &g, m, v, decay, &k)?,
            };
            var.set(&p.to_dtype(var.dtype())?)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        self.steps_done += 1;
        Ok(())
    }

    /// The state as named tensors: `adamw.step` (i64, shape [1]), `adamw.m.<param>`,
    /// `adamw.v.<param>`. The prefix lets it share a safetensors file with model weights.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        out.insert(STEP_KEY.to_string(), Tensor::new(&[self.steps_done as i64], &Device::Cpu)?);
        for (name, m) in &self.m {
            out.insert(format!("{M_PREFIX}{name}"), m.clone());
        }
        for (name, v) in &self.v {
            out.insert(format!("{V_PREFIX}{name}"), v.clone());
        }
        Ok(out)
    }

    /// Restores a state written by [`AdamW::state_tensors`] for these `params` (moments are
    /// moved to each parameter's device). Keys without the `adamw.` prefix are ignored; a
    /// moment for a parameter not in `params`, a missing or mis-shaped one is an error, since
    /// resuming with a different parameter set would not continue the same run.
    pub fn from_state_tensors(cfg: AdamWConfig, state: &HashMap<String, Tensor>, params: &[(String, Var)]) -> Result<Self> {
        let step = state.get(STEP_KEY).with_context(|| format!("optimizer state has no `{STEP_KEY}`"))?;
        let steps = step.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
        let &[steps_done] = steps.as_slice() else { bail!("`{STEP_KEY}` must hold one value") };
        ensure!(steps_done >= 0, "`{STEP_KEY}` is negative");
        let mut opt = Self::new(cfg);
        opt.steps_done = steps_done as u64;
        let by_name: HashMap<&str, &Var> = params.iter().map(|(n, v)| (n.as_str(), v)).collect();
        for (key, t) in state {
            let (prefix, name) = if let Some(n) = key.strip_prefix(M_PREFIX) {
                (M_PREFIX, n)
            } else if let Some(n) = key.strip_prefix(V_PREFIX) {
                (V_PREFIX, n)
            } else {
                continue;
            };
            let var = by_name.get(name).with_context(|| format!("optimizer state `{key}` is for a parameter the model does not train"))?;
            ensure!(t.dims() == var.dims(), "optimizer state `{key}` has shape {:?}, the parameter {:?}", t.dims(), var.dims());
            let t = t.to_dtype(acc_dtype(var.dtype()))?.to_device(var.device())?;
            let map = if prefix == M_PREFIX { &mut opt.m } else { &mut opt.v };
            map.insert(name.to_string(), t);
        }
        if opt.steps_done > 0 {
            for (name, _) in params {
                ensure!(
                    opt.m.contains_key(name) && opt.v.contains_key(name),
                    "optimizer state has no moments for `{name}` after {} steps",
                    opt.steps_done
                );
            }
        }
        Ok(opt)
    }

    /// Writes [`AdamW::state_tensors`] as a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        candle_core::safetensors::save(&self.state_tensors()?, path).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Reads a file written by [`AdamW::save`].
    pub fn load(cfg: AdamWConfig, path: &Path, params: &[(String, Var)]) -> Result<Self> {
        let state = candle_core::safetensors::load(path, &Device::Cpu).with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_state_tensors(cfg, &state, params).with_context(|| format!("{}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass CPU update equals the composed tensor ops (which other devices run).
    #[test]
    fn fused_update_equals_composed() {
        let k = Coeffs { b1: 0.9, b2: 0.999, eps: 1e-8, step_size: 3e-3 / (1.0 - 0.9f64.powi(3)), inv_bc2: 1.0 / (1.0 - 0.999f64.powi(3)) };
        for dtype in [DType::F64, DType::F32] {
            let r = |seed: u64| {
                let v: Vec<f64> = (0..300).map(|i| ((i as f64 + seed as f64) * 0.37).sin()).collect();
                Tensor::from_vec(v, (20, 15), &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
            };
            let var = Var::from_tensor(&r(1)).unwrap();
            let (g, m, v) = (r(2), r(3), r(4).abs().unwrap());
            for (mv, decay) in [(None, 1.0), (Some((&m, &v)), 0.97)] {
                let (ms, vs) = (mv.map(|x| x.0), mv.map(|x| x.1));
                let fused = fused_update(var.as_tensor(), &g, ms, vs, decay, &k).unwrap().expect("CPU f32/f64 takes the fused path");
                let composed = composed_update(&var, &g, ms, vs, decay, &k).unwrap();
                for (a, b) in [(&fused.0, &composed.0), (&fused.1, &composed.1), (&fused.2, &composed.2)] {
                    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
                    let tol = if dtype == DType::F64 { 1e-15 } else { 1e-6 };
                    assert!(d <= tol, "{dtype:?}: differs by {d}");
                }
            }
        }
    }
}
