//! Shared helpers for the integration tests: fixtures and the live mlx-lm oracle.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every fixture checkpoint written by scripts/make_fixtures.py.
pub fn fixtures() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(root().join("fixtures"))
        .expect("fixtures/ is missing: run scripts/make_fixtures.py")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").exists())
        .collect();
    out.sort();
    assert!(out.len() >= 5, "expected the fixture checkpoints under fixtures/, found {}", out.len());
    out
}

/// The Python that has mlx + mlx-lm (made by .ci/run). Missing oracle = failed test, never a skip.
pub fn oracle_python() -> PathBuf {
    let p = std::env::var_os("ZMLX_ORACLE_PYTHON").map(PathBuf::from).unwrap_or_else(|| root().join(".venv/bin/python"));
    assert!(p.exists(), "oracle python {} not found: run .ci/run (or set ZMLX_ORACLE_PYTHON to a python with mlx-cpu and mlx-lm)", p.display());
    p
}

/// Run scripts/oracle_generate.py with a batch of requests; returns its parsed JSON list.
pub fn oracle_batch(model: &Path, requests: &serde_json::Value) -> Vec<serde_json::Value> {
    let file = std::env::temp_dir().join(format!("zmlx-oracle-{}-{}.json", std::process::id(), model.file_name().unwrap().to_string_lossy()));
    std::fs::write(&file, requests.to_string()).unwrap();
    let out = Command::new(oracle_python())
        .arg(root().join("scripts/oracle_generate.py"))
        .arg("--model")
        .arg(model)
        .arg("--batch")
        .arg(&file)
        .output()
        .expect("cannot start the oracle");
    std::fs::remove_file(&file).ok();
    assert!(out.status.success(), "oracle failed on {}: {}", model.display(), String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().expect("oracle printed nothing");
    serde_json::from_str::<serde_json::Value>(last).unwrap().as_array().unwrap().clone()
}

/// mlx-lm's token list with a trailing EOS removed (zmlx does not emit the EOS id).
pub fn oracle_tokens(result: &serde_json::Value) -> (Vec<u32>, bool) {
    let mut toks: Vec<u32> = result["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    let stopped = result["finish_reason"] == "stop";
    if stopped {
        toks.pop();
    }
    (toks, stopped)
}

/// Run the zmlx binary; returns (exit code, stdout, stderr).
pub fn zmlx(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_zmlx")).args(args).output().expect("cannot run zmlx");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// A small deterministic generator for prompt ids (no rand dependency in tests).
pub struct Lcg(pub u64);
impl Lcg {
    pub fn next(&mut self, bound: u32) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % bound as u64) as u32
    }
}
