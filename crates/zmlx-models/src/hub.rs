//! Resolving `--model`: a folder, or a Hugging Face repo id found in the local
//! HF cache (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`). Nothing is downloaded.

use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

pub fn resolve_model_path(model: &str) -> Result<PathBuf> {
    let as_path = Path::new(model);
    if as_path.is_dir() {
        return Ok(as_path.to_path_buf());
    }
    let looks_like_repo = model.split('/').count() == 2 && !model.starts_with('.') && !model.starts_with('/');
    if !looks_like_repo {
        return Err(ModelError::file(as_path, "model folder not found"));
    }
    let hub = hf_hub_dir();
    let repo_dir = hub.join(format!("models--{}", model.replace('/', "--")));
    let snapshot = std::fs::read_to_string(repo_dir.join("refs").join("main"))
        .ok()
        .map(|r| repo_dir.join("snapshots").join(r.trim()))
        .filter(|p| p.is_dir())
        .or_else(|| {
            // No refs/main: take the newest snapshot folder.
            let mut snaps: Vec<PathBuf> = std::fs::read_dir(repo_dir.join("snapshots")).ok()?.filter_map(|e| e.ok().map(|e| e.path())).collect();
            snaps.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
            snaps.pop()
        });
    snapshot.ok_or_else(|| {
        ModelError::invalid(format!(
            "model `{model}` is neither a folder nor in the Hugging Face cache ({}); zmlx does not download models",
            hub.display()
        ))
    })
}

fn hf_hub_dir() -> PathBuf {
    if let Ok(cache) = std::env::var("HF_HUB_CACHE") {
        return PathBuf::from(cache);
    }
    if let Ok(home) = std::env::var("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache").join("huggingface").join("hub")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_snapshot_in_hf_cache() {
        let tmp = std::env::temp_dir().join(format!("zmlx-hub-{}", std::process::id()));
        let repo = tmp.join("hub").join("models--org--name");
        std::fs::create_dir_all(repo.join("snapshots").join("abc123")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "abc123\n").unwrap();
        std::env::set_var("HF_HOME", &tmp);
        std::env::remove_var("HF_HUB_CACHE");
        assert_eq!(resolve_model_path("org/name").unwrap(), repo.join("snapshots").join("abc123"));
        let err = resolve_model_path("org/missing").unwrap_err().to_string();
        assert!(err.contains("org/missing") && err.contains("does not download"), "{err}");
        std::fs::remove_dir_all(&tmp).ok();
    }
}
