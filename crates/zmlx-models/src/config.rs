//! `config.json`: the architecture and its quantization, as mlx-lm reads them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::Value;
use zmlx_core::QuantSpec;

use crate::error::{ModelError, Result};

/// Quantization of the checkpoint: a default and per-module overrides, from
/// `quantization` (or `quantization_config`) in config.json, as mlx_lm.convert writes it.
#[derive(Clone, Debug, Default)]
pub struct Quantization {
    pub default: Option<QuantSpec>,
    /// Full module path (`model.layers.0.mlp.gate`) → its spec, or `None` for "left unquantized".
    pub overrides: HashMap<String, Option<QuantSpec>>,
}

impl Quantization {
    /// The spec of a module whose `.scales` tensor exists in the checkpoint
    /// (mlx-lm's rule: a module is quantized iff its scales were saved).
    pub fn spec_for(&self, module: &str) -> Option<QuantSpec> {
        match self.overrides.get(module) {
            Some(spec) => *spec,
            None => self.default,
        }
    }

    /// What `mlx_lm.convert -q --q-bits BITS --q-group-size GROUP` writes for this model:
    /// the default plus the family's `quant_predicate` overrides (mlx-lm 0.32). Used to build
    /// `--dummy-weights` models from the original Hugging Face config.json.
    pub fn mlx_lm_convert(config: &ModelConfig, bits: u32, group_size: usize) -> Result<Self> {
        let spec = QuantSpec::new(bits, group_size).map_err(|e| ModelError::invalid(format!("--bits/--group-size: {e}")))?;
        let mut q = Quantization { default: Some(spec), overrides: HashMap::new() };
        let layers = config.raw.get("num_hidden_layers").and_then(Value::as_u64).unwrap_or(0);
        let router_8bit = QuantSpec::new(8, 64).ok();
        if config.model_type == "qwen3_moe" {
            // qwen3_moe.quant_predicate: the router `mlp.gate` stays at 8 bits, group 64.
            for i in 0..layers {
                q.overrides.insert(format!("model.layers.{i}.mlp.gate"), router_8bit);
            }
        }
        Ok(q)
    }
}

/// A parsed config.json: the raw JSON (each architecture reads its own typed
/// view) plus what every model shares.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub path: PathBuf,
    pub model_type: String,
    pub raw: Value,
    pub quantization: Quantization,
}

impl ModelConfig {
    pub fn load(model_dir: &Path) -> Result<Self> {
        let path = model_dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::file(&path, format!("cannot read: {e}")))?;
        Self::parse(&path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let raw: Value = serde_json::from_str(text).map_err(|e| ModelError::file(path, format!("not valid JSON: {e}")))?;
        let obj = raw.as_object().ok_or_else(|| ModelError::file(path, "expected a JSON object"))?;
        let model_type = obj
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| ModelError::file(path, "missing string field `model_type`"))?
            .to_string();
        let quantization = match obj.get("quantization").or_else(|| obj.get("quantization_config")) {
            Some(q) => parse_quantization(path, q)?,
            None => Quantization::default(),
        };
        Ok(ModelConfig { path: path.to_path_buf(), model_type, raw, quantization })
    }

    /// The typed view of an architecture's arguments; serde names the missing or mistyped field.
    pub fn args<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.raw.clone()).map_err(|e| ModelError::file(&self.path, format!("{} config: {e}", self.model_type)))
    }

    /// `eos_token_id` as a list (it may be an int or a list).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        token_id_list(self.raw.get("eos_token_id"))
    }
}

/// A token id field that may be an int or a list of ints.
pub fn token_id_list(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|v| v as u32).collect(),
        _ => vec![],
    }
}

fn parse_spec(path: &Path, key: &str, v: &Value) -> Result<QuantSpec> {
    let field = |name: &str| {
        v.get(name)
            .and_then(Value::as_u64)
            .ok_or_else(|| ModelError::file(path, format!("quantization `{key}`: missing integer `{name}`")))
    };
    if let Some(mode) = v.get("mode").and_then(Value::as_str) {
        if mode != "affine" {
            return Err(ModelError::file(path, format!("quantization `{key}`: mode `{mode}` is not supported (only MLX affine)")));
        }
    }
    QuantSpec::new(field("bits")? as u32, field("group_size")? as usize)
        .map_err(|e| ModelError::file(path, format!("quantization `{key}`: {e}")))
}

fn parse_quantization(path: &Path, q: &Value) -> Result<Quantization> {
    let obj = q.as_object().ok_or_else(|| ModelError::file(path, "`quantization` must be an object"))?;
    let mut out = Quantization::default();
    if obj.contains_key("bits") || obj.contains_key("group_size") {
        out.default = Some(parse_spec(path, "quantization", q)?);
    }
    for (key, v) in obj {
        match v {
            Value::Object(_) => {
                out.overrides.insert(key.clone(), Some(parse_spec(path, key, v)?));
            }
            Value::Bool(false) => {
                out.overrides.insert(key.clone(), None);
            }
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_module_override() {
        let text = r#"{"model_type":"qwen3_moe","quantization":{"group_size":64,"bits":4,"mode":"affine",
            "model.layers.0.mlp.gate":{"group_size":64,"bits":8},"model.layers.1.mlp.gate":false}}"#;
        let c = ModelConfig::parse(Path::new("config.json"), text).unwrap();
        assert_eq!(c.quantization.spec_for("model.layers.0.mlp.gate").unwrap().bits, 8);
        assert!(c.quantization.spec_for("model.layers.1.mlp.gate").is_none());
        assert_eq!(c.quantization.spec_for("model.layers.0.self_attn.q_proj").unwrap().bits, 4);
    }

    #[test]
    fn errors_name_the_file() {
        let e = ModelConfig::parse(Path::new("/m/config.json"), "{\"hidden_size\": 3}").unwrap_err();
        assert_eq!(e.to_string(), "/m/config.json: missing string field `model_type`");
        let e = ModelConfig::parse(Path::new("/m/config.json"), "{oops").unwrap_err();
        assert!(e.to_string().starts_with("/m/config.json: not valid JSON"));
    }
}
