//! Checkpoints: one safetensors file holding the weights (`model.*`), the optimizer state
//! (`optim.*`) and, in its header metadata, the step, data position and run settings. Written to
//! a temporary file, synced, then renamed over the previous one, so a kill during a save leaves
//! the previous checkpoint intact.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, TensorView};
use serde::{Deserialize, Serialize};

/// Where training stands, stored with the tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct State {
    /// Optimizer steps completed.
    pub step: u64,
    /// Epoch of the next micro-batch and its index within the epoch's packed batches.
    pub epoch: u64,
    pub batch_in_epoch: u64,
    /// Run settings that must not change across a resume (seed, data, model shape, ...).
    pub fingerprint: String,
    /// Training tokens seen so far.
    pub tokens: u64,
}

fn bytes_of(t: &Tensor) -> anyhow::Result<(StDtype, Vec<u8>)> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => (StDtype::F32, t.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
        DType::F64 => (StDtype::F64, t.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
        DType::I64 => (StDtype::I64, t.to_vec1::<i64>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
        other => bail!("cannot checkpoint a {other:?} tensor"),
    })
}

/// Writes `tensors` and `state` to `path` atomically.
pub fn save(path: &Path, tensors: &[(String, Tensor)], state: &State) -> anyhow::Result<()> {
    let mut data = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let (dtype, bytes) = bytes_of(t).with_context(|| format!("tensor {name}"))?;
        data.push((name.clone(), dtype, t.dims().to_vec(), bytes));
    }
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<anyhow::Result<_>>()?;
    let meta: HashMap<String, String> = [("state".to_string(), serde_json::to_string(state)?)].into();
    let bytes = safetensors::serialize(views, Some(meta))?;
    let tmp = path.with_extension("safetensors.tmp");
    {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(&bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    if let Some(dir) = path.parent() {
        // The rename is durable once the directory entry is.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Reads a checkpoint written by [`save`].
pub fn load(path: &Path, device: &Device) -> anyhow::Result<(HashMap<String, Tensor>, State)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{} is not a checkpoint: {e}", path.display()))?;
    let state: State = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("state"))
        .context("checkpoint has no state")
        .and_then(|s| serde_json::from_str(s).context("checkpoint state is unreadable"))
        .with_context(|| format!("{}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let t = match view.dtype() {
            StDtype::F32 => {
                let v: Vec<f32> = view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
                Tensor::from_vec(v, shape, device)?
            }
            StDtype::F64 => {
                let v: Vec<f64> = view.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect();
                Tensor::from_vec(v, shape, device)?
            }
            StDtype::I64 => {
                let v: Vec<i64> = view.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
                Tensor::from_vec(v, shape, &Device::Cpu)?
            }
            other => bail!("{}: tensor {name} has unexpected dtype {other:?}", path.display()),
        };
        out.insert(name, t);
    }
    Ok((out, state))
}
