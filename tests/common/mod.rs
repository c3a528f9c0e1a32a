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

/// Run `scripts/<script>` with `args` and then a temporary JSON file holding `input`; returns
/// the JSON its last stdout line holds. A failing or silent oracle fails the test.
pub fn oracle_json(script: &str, args: &[&str], input: &serde_json::Value) -> serde_json::Value {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = std::env::temp_dir().join(format!("zmlx-oracle-{}-{n}-{script}.json", std::process::id()));
    std::fs::write(&file, input.to_string()).unwrap();
    let out = Command::new(oracle_python()).arg(root().join("scripts").join(script)).args(args).arg(&file).output().expect("cannot start the oracle");
    std::fs::remove_file(&file).ok();
    assert!(out.status.success(), "{script} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().expect("the oracle printed nothing")).unwrap()
}

/// Run scripts/oracle_generate.py with a batch of requests; returns its parsed JSON list.
pub fn oracle_batch(model: &Path, requests: &serde_json::Value) -> Vec<serde_json::Value> {
    let model_arg = model.to_string_lossy();
    oracle_json("oracle_generate.py", &["--model", &model_arg, "--batch"], requests).as_array().unwrap().clone()
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
