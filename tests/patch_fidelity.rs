//! The contract's first clause on the CPU: every pattern on by default gives bitwise the same
//! logits (hence the same greedy tokens) as the unpatched model, on every fixture.

mod common;

use common::*;
use zmlx_models::patch::{plan, Backend, PatchOptions, Pattern, ALL_PATTERNS};
use zmlx_models::{generate, Decoder, LoadedModel, SamplingOptions};

fn logits_and_tokens(d: &mut dyn Decoder, prompt: &[u32]) -> (Vec<u32>, Vec<u32>) {
    d.reset();
    let bits: Vec<u32> = d.forward(prompt).unwrap().iter().map(|x| x.to_bits()).collect();
    d.reset();
    let (tokens, _) = generate(d, prompt, 24, SamplingOptions::default(), &[], |_| {}).unwrap();
    (bits, tokens)
}

#[test]
fn patched_equals_unpatched_on_every_fixture() {
    let preset = plan("qwen3_moe", Backend::Cpu, &PatchOptions::default());
    assert!(preset.len() >= 3, "the CPU preset should enable the MoE fusions: {preset:?}");
    for dir in fixtures() {
        let model = LoadedModel::load(dir.to_str().unwrap()).unwrap();
        let vocab = model.config.raw["vocab_size"].as_u64().unwrap() as u32;
        let mut rng = Lcg(7 + dir.to_string_lossy().len() as u64);
        let prompts: Vec<Vec<u32>> = [3usize, 21].iter().map(|&n| (0..n).map(|_| rng.next(vocab)).collect()).collect();
        let mut session = model.cpu_session();
        drop(model);
        let baseline: Vec<_> = prompts.iter().map(|p| logits_and_tokens(&mut session, p)).collect();
        // The preset, then each pattern alone.
        let mut configs = vec![preset.clone()];
        configs.extend(ALL_PATTERNS.iter().flat_map(|p| p.expand()).map(|p| vec![p]));
        for patterns in configs {
            let report = session.patch(&patterns).unwrap();
            for (p, want) in prompts.iter().zip(&baseline) {
                let got = logits_and_tokens(&mut session, p);
                assert!(got.0 == want.0, "{}: {patterns:?} changed the logits ({report})", dir.display());
                assert_eq!(got.1, want.1, "{}: {patterns:?} changed the tokens", dir.display());
            }
            if patterns == preset {
                assert!(report.total() > 0, "{}: preset patched nothing", dir.display());
            }
        }
        session.patch(&[]).unwrap();
    }
}

#[test]
fn patch_report_reads_like_zmlx() {
    let model = LoadedModel::load(root().join("fixtures/tiny-qwen3-moe-4bit-tied").to_str().unwrap()).unwrap();
    let mut s = model.cpu_session();
    drop(model);
    let r = s.patch(&[Pattern::GatherQmmSwiglu, Pattern::GatherQmmCombine, Pattern::SwigluMlp]).unwrap();
    // 4 layers: 2 MoE (layers 1, 3) and 2 dense (layers 0, 2).
    assert_eq!(r.to_string(), "Patched 6 modules: gather_qmm_combine=2 gather_qmm_swiglu=2 swiglu_mlp=2");
}

#[test]
fn validate_cli_reports_fidelity_and_json() {
    let dir = root().join("fixtures/tiny-qwen3-moe-4bit");
    let (code, stdout, stderr) = zmlx(&["validate", "--model", dir.to_str().unwrap(), "--max-tokens", "16", "--runs", "2", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(v["fidelity"]["identical"], v["fidelity"]["total"]);
    assert_eq!(v["fidelity"]["total"], 16);
    assert!(v["patched_modules"].as_u64().unwrap() > 0 && v["speedup"].as_f64().unwrap() > 0.0);
    assert!(v["patterns"].as_array().unwrap().iter().any(|p| p == "gather_qmm_swiglu"));
    let (code, _, stderr) = zmlx(&["validate", "--model", dir.to_str().unwrap(), "--patterns", "moe_mlp,nonsense"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("nonsense") && stderr.lines().count() == 1, "{stderr}");
    // Sampled: both sides draw with the same seed, so the tokens must still be identical, and
    // they are not the greedy ones.
    let sampled = ["--temp", "0.9", "--top-p", "0.95", "--min-p", "0.02", "--top-k", "40", "--seed", "7", "--ignore-eos"];
    let args: Vec<&str> = ["validate", "--model", dir.to_str().unwrap(), "--max-tokens", "16", "--runs", "2", "--json"].into_iter().chain(sampled).collect();
    let (code, stdout, stderr) = zmlx(&args);
    assert_eq!(code, 0, "{stderr}");
    let s: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(s["fidelity"]["identical"], 16);
    assert_eq!(s["sampling"]["seed"], 7);
    assert_ne!(s["patched_tokens"], v["patched_tokens"], "sampling at temp 0.9 should leave the greedy path");
    let (code, _, stderr) = zmlx(&["validate", "--model", dir.to_str().unwrap(), "--min-p", "2"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("--min-p") && stderr.lines().count() == 1, "{stderr}");
}
