//! zmlx-models: checkpoints, architectures (one file each, read like mlx-lm),
//! tokenizer and chat template, generation.

pub mod checkpoint;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod generate;
pub mod hub;
pub mod nn;
pub mod patch;
pub mod tokenizer;
pub mod models {
    pub mod qwen3_moe;
}

use std::path::PathBuf;
use std::sync::Arc;

pub use config::ModelConfig;
pub use error::{ModelError, Result};
pub use generate::{generate, logprobs, Decoder, GenerationStats, SamplingOptions};
pub use tokenizer::Tokenizer;
use zmlx_core::DType;

/// The architectures zmlx runs.
pub enum Architecture {
    Qwen3Moe(models::qwen3_moe::Model),
}

pub const SUPPORTED_MODEL_TYPES: &[&str] = &["qwen3_moe"];

/// A model folder without its weights: config, tokenizer, EOS ids. (A folder holding only a
/// config.json is enough for `--dummy-weights`.)
pub struct ModelFolder {
    pub path: PathBuf,
    pub config: ModelConfig,
    pub tokenizer: Option<Tokenizer>,
}

impl ModelFolder {
    /// `model` is a folder or a Hugging Face repo id in the local cache.
    pub fn open(model: &str) -> Result<Self> {
        let path = hub::resolve_model_path(model)?;
        let config = ModelConfig::load(&path)?;
        if !SUPPORTED_MODEL_TYPES.contains(&config.model_type.as_str()) {
            return Err(ModelError::file(
                &config.path,
                format!("model_type `{}` is not supported (supported: {})", config.model_type, SUPPORTED_MODEL_TYPES.join(", ")),
            ));
        }
        let tokenizer = Tokenizer::load(&path)?;
        Ok(ModelFolder { path, config, tokenizer })
    }

    /// EOS ids as mlx-lm 0.32 picks them: `eos_token_id` of generation_config.json
    /// (else config.json), plus the tokenizer's `eos_token`.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let from_generation_config = std::fs::read_to_string(self.path.join("generation_config.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .map(|v| config::token_id_list(v.get("eos_token_id")))
            .filter(|ids| !ids.is_empty());
        let mut ids = from_generation_config.unwrap_or_else(|| self.config.eos_token_ids());
        if let Some(id) = self.tokenizer.as_ref().and_then(|t| t.eos_token_id()) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }

    /// Load the weights for the CPU reference.
    pub fn load_weights(self) -> Result<LoadedModel> {
        let ckpt = checkpoint::Checkpoint::open(&self.path)?;
        let arch = match self.config.model_type.as_str() {
            "qwen3_moe" => Architecture::Qwen3Moe(models::qwen3_moe::Model::load(&self.config, &ckpt)?),
            _ => unreachable!("checked against SUPPORTED_MODEL_TYPES"),
        };
        Ok(LoadedModel { folder: self, arch: Arc::new(arch) })
    }
}

/// A model folder with its weights loaded for the CPU.
pub struct LoadedModel {
    pub folder: ModelFolder,
    pub arch: Arc<Architecture>,
}

impl std::ops::Deref for LoadedModel {
    type Target = ModelFolder;
    fn deref(&self) -> &ModelFolder {
        &self.folder
    }
}

impl LoadedModel {
    pub fn load(model: &str) -> Result<Self> {
        ModelFolder::open(model)?.load_weights()
    }

    /// A fresh CPU decoding session (its own KV cache) over these weights.
    pub fn cpu_session(&self) -> CpuSession {
        let cache = match self.arch.as_ref() {
            Architecture::Qwen3Moe(m) => m.new_cache(),
        };
        CpuSession { arch: self.arch.clone(), cache, routing: Vec::new() }
    }
}

/// The CPU reference decoder.
pub struct CpuSession {
    arch: Arc<Architecture>,
    cache: Vec<nn::KvCache>,
    routing: Vec<models::qwen3_moe::Routing>,
}

impl CpuSession {
    fn model(&self) -> &models::qwen3_moe::Model {
        match self.arch.as_ref() {
            Architecture::Qwen3Moe(m) => m,
        }
    }
}

impl Decoder for CpuSession {
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let vocab = self.vocab_size();
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::invalid(format!("token id {bad} is out of range (vocab size {vocab})")));
        }
        let max = self.model().args.max_position_embeddings;
        let len = self.cache.first().map_or(0, |c| c.len) + tokens.len();
        if len > max {
            return Err(ModelError::invalid(format!("sequence of {len} tokens exceeds max_position_embeddings ({max})")));
        }
        let arch = self.arch.clone();
        let Architecture::Qwen3Moe(m) = arch.as_ref();
        Ok(m.forward(tokens, &mut self.cache, &mut self.routing))
    }

    fn reset(&mut self) {
        self.cache = self.model().new_cache();
    }

    fn patch(&mut self, patterns: &[patch::Pattern]) -> Result<patch::PatchReport> {
        let arch = Arc::get_mut(&mut self.arch).ok_or_else(|| ModelError::invalid("cannot patch a model shared by several sessions"))?;
        let Architecture::Qwen3Moe(m) = arch;
        let report = m.patch(patterns);
        self.reset();
        Ok(report)
    }

    fn backend(&self) -> patch::Backend {
        patch::Backend::Cpu
    }

    fn last_routing(&self) -> Result<Option<Vec<models::qwen3_moe::Routing>>> {
        Ok(Some(self.routing.clone()))
    }

    fn vocab_size(&self) -> usize {
        self.model().embed_tokens.vocab()
    }

    fn dtype(&self) -> DType {
        self.model().dtype
    }
}
