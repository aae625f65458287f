//! Reading GGUF metadata (header only; tensors are not loaded here).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use candle_core::quantized::gguf_file::{Content, Value};

/// The metadata of a GGUF file.
pub struct GgufMetadata {
    pub path: std::path::PathBuf,
    pub values: HashMap<String, Value>,
}

impl GgufMetadata {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let content = Content::read(&mut f)
            .map_err(|e| anyhow!("{} is not a readable GGUF file: {e}", path.display()))?;
        Ok(GgufMetadata { path: path.to_path_buf(), values: content.metadata })
    }

    fn get(&self, key: &str) -> anyhow::Result<&Value> {
        self.values.get(key).ok_or_else(|| anyhow!("{}: GGUF metadata has no `{key}`", self.path.display()))
    }

    pub fn string(&self, key: &str) -> anyhow::Result<&str> {
        Ok(self.get(key)?.to_string().map_err(|e| anyhow!("`{key}`: {e}"))?.as_str())
    }

    pub fn opt_string(&self, key: &str) -> Option<&str> {
        self.values.get(key).and_then(|v| v.to_string().ok()).map(String::as_str)
    }

    pub fn opt_u32(&self, key: &str) -> Option<u32> {
        self.values.get(key).and_then(|v| v.to_u32().ok())
    }

    pub fn opt_bool(&self, key: &str) -> Option<bool> {
        self.values.get(key).and_then(|v| v.to_bool().ok())
    }

    pub fn strings(&self, key: &str) -> anyhow::Result<Vec<String>> {
        let arr = self.get(key)?.to_vec().map_err(|e| anyhow!("`{key}`: {e}"))?;
        arr.iter()
            .map(|v| v.to_string().cloned().map_err(|e| anyhow!("`{key}`: {e}")))
            .collect()
    }

    pub fn i32s(&self, key: &str) -> anyhow::Result<Vec<i32>> {
        let arr = self.get(key)?.to_vec().map_err(|e| anyhow!("`{key}`: {e}"))?;
        arr.iter()
            .map(|v| match v {
                Value::I32(x) => Ok(*x),
                Value::U32(x) => Ok(*x as i32),
                Value::I8(x) => Ok(*x as i32),
                Value::U8(x) => Ok(*x as i32),
                other => bail!("`{key}`: expected integers, found {other:?}"),
            })
            .collect()
    }
}
