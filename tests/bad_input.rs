//! Bad input gives one clear error line (naming the file or value) and a non-zero exit; never a panic.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// A scratch copy of the bundled fixture that a test may damage.
fn scratch_model(tag: &str) -> PathBuf {
    let src = root().join("fixtures/tiny-qwen3-moe-bf16");
    let dst = std::env::temp_dir().join(format!("zmlx-bad-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&dst).ok();
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    dst
}

fn weights_file(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).find(|p| p.extension().is_some_and(|x| x == "safetensors")).unwrap()
}

/// Runs `zmlx generate` on `model`; asserts failure with one stderr line containing every `needle`.
fn expect_error(model: &Path, extra: &[&str], needles: &[&str]) {
    let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--max-tokens", "4"];
    if !extra.iter().any(|a| a.starts_with("--prompt")) {
        args.extend(["--prompt-tokens", "1,2,3"]);
    }
    args.extend(extra);
    let (code, _stdout, stderr) = zmlx(&args);
    assert_ne!(code, 0, "expected failure for {needles:?}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "want one error line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "error line {:?} does not mention {n:?}", lines[0]);
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
}

#[test]
fn truncated_safetensors() {
    let dir = scratch_model("trunc");
    let w = weights_file(&dir);
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() * 2 / 3]).unwrap();
    expect_error(&dir, &[], &[w.file_name().unwrap().to_str().unwrap(), "truncated"]);
}

#[test]
fn corrupt_safetensors_header() {
    let dir = scratch_model("header");
    let w = weights_file(&dir);
    let mut bytes = std::fs::read(&w).unwrap();
    bytes[8..40].copy_from_slice(&[b'#'; 32]);
    std::fs::write(&w, &bytes).unwrap();
    expect_error(&dir, &[], &[w.file_name().unwrap().to_str().unwrap(), "header"]);
    // A file too short to hold a header at all.
    std::fs::write(&w, b"abc").unwrap();
    expect_error(&dir, &[], &[w.file_name().unwrap().to_str().unwrap(), "not a safetensors file"]);
}

#[test]
fn missing_and_malformed_config() {
    let dir = scratch_model("config");
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"qwen3_moe\", ").unwrap();
    expect_error(&dir, &[], &["config.json", "not valid JSON"]);
    std::fs::remove_file(dir.join("config.json")).unwrap();
    expect_error(&dir, &[], &["config.json", "cannot read"]);
}

#[test]
fn config_missing_field_and_unknown_model_type() {
    let dir = scratch_model("fields");
    edit_config(&dir, |v| {
        v.as_object_mut().unwrap().remove("num_experts");
    });
    expect_error(&dir, &[], &["config.json", "num_experts"]);
    edit_config(&dir, |v| v["model_type"] = "llama9000".into());
    expect_error(&dir, &[], &["config.json", "llama9000", "not supported"]);
}

#[test]
fn shapes_disagree_with_config() {
    let dir = scratch_model("shape");
    edit_config(&dir, |v| v["moe_intermediate_size"] = 48.into());
    expect_error(&dir, &[], &["switch_mlp", "shape", "48"]);
}

#[test]
fn token_ids_out_of_range_and_bad_values() {
    let dir = root().join("fixtures/tiny-qwen3-moe-bf16");
    expect_error(&dir, &["--prompt-tokens", "1,99999999"], &["99999999", "out of range"]);
    expect_error(&dir, &["--prompt-tokens", "1,abc"], &["abc"]);
    expect_error(&dir, &["--temp=-1"], &["--temp"]);
}

#[test]
fn missing_model() {
    expect_error(Path::new("/nonexistent/model-dir"), &[], &["/nonexistent/model-dir", "not found"]);
    let empty = std::env::temp_dir().join(format!("zmlx-empty-hf-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zmlx"))
        .args(["generate", "--model", "mlx-community/Qwen3-30B-A3B-4bit", "--prompt-tokens", "1"])
        .env("HF_HOME", &empty)
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("mlx-community/Qwen3-30B-A3B-4bit") && stderr.contains("does not download"), "{stderr}");
}
