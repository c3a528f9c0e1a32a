//! `zmlx bench`: capsules (normal and stress), `bench report`, and `--routing-stats`, on the CPU.

mod common;

use common::*;

fn capsule_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("zmlx-bench-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    d
}

#[test]
fn bench_writes_a_capsule_with_routing_stats_and_report_reads_it() {
    let dir = capsule_dir("routing");
    let model = root().join("fixtures/tiny-qwen3-moe-4bit");
    let (code, stdout, stderr) = zmlx(&["bench", "--model", model.to_str().unwrap(), "--gen-lens", "8,16", "--runs", "2",
        "--routing-stats", "--out-dir", dir.to_str().unwrap(), "--name", "cap"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("fidelity: 4/4 runs token-identical"), "{stdout}");
    let path = dir.join("cap.json");
    let c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(c["schema"], "zmlx-bench/1");
    assert_eq!(c["summary"].as_array().unwrap().len(), 2);
    assert_eq!(c["runs"].as_array().unwrap().len(), 4);
    assert!(c["git_commit"].is_string() && c["machine"]["cores"].as_u64().unwrap() > 0);
    // Routing: every MoE layer (3 here), 8 decoded tokens x top-2 of 8 experts.
    let r = &c["routing"];
    let layers = r["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3, "{r}");
    let n = r["tokens"].as_u64().unwrap();
    assert_eq!(n, 8);
    for l in layers {
        let counts: Vec<u64> = l["counts"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert!(counts.len() <= 8, "expert id out of range: {l}");
        assert_eq!(counts.iter().sum::<u64>(), n * 2, "{l}");
        let h = l["entropy_bits"].as_f64().unwrap();
        assert!(h > 0.0 && h <= 3.0 + 1e-9, "entropy {h}");
        // norm_topk_prob: each token's two weights sum to ~1.
        let w: f64 = l["weight_sums"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).sum();
        assert!((w - n as f64).abs() < 0.05 * n as f64, "weights sum {w} for {n} tokens");
    }
    // The same capsule through `bench report`; an invalid capsule is one error line.
    let (code, out, _) = zmlx(&["bench", "report", path.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("decode tok/s") && out.contains("routing: 8 tokens"), "{out}");
    std::fs::write(dir.join("bad.json"), "{\"schema\": 1}").unwrap();
    let (code, _, err) = zmlx(&["bench", "report", dir.join("bad.json").to_str().unwrap()]);
    assert_ne!(code, 0);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(c["settings"]["sampling"], "greedy");
    // Never overwrite: the same name again gets a new file. Sampled runs record their settings
    // and replay the same tokens run to run (one seed).
    let (code, stdout, stderr) = zmlx(&["bench", "--model", model.to_str().unwrap(), "--gen-lens", "4", "--runs", "2", "--out-dir", dir.to_str().unwrap(), "--name", "cap",
        "--temp", "0.8", "--top-p", "0.9", "--seed", "5"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("cap-1.json") && stdout.contains("fidelity: 2/2 runs token-identical"), "{stdout}");
    let c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("cap-1.json")).unwrap()).unwrap();
    assert_eq!(c["settings"]["sampling"]["seed"], 5);
    assert_eq!(c["settings"]["sampling"]["top_p"].as_f64().unwrap() as f32, 0.9);
    assert!(stdout.contains("sampled: ") && stdout.contains("seed 5"), "{stdout}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn stress_protocol_capsule_reports_by_length_and_style() {
    let dir = capsule_dir("stress");
    let model = root().join("fixtures/tiny-qwen3-moe-4bit-tied");
    let (code, stdout, stderr) = zmlx(&["bench", "--model", model.to_str().unwrap(), "--stress", "--stress-lens", "8,12", "--runs", "1",
        "--out-dir", dir.to_str().unwrap(), "--name", "s"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("by length:") && stdout.contains("by prompt style:") && stdout.contains("chinese"), "{stdout}");
    assert!(stdout.contains("fidelity: 10/10 configs token-identical"), "{stdout}");
    let c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("s.json")).unwrap()).unwrap();
    assert_eq!(c["schema"], "zmlx-stress/1");
    assert_eq!(c["stress"].as_array().unwrap().len(), 10);
    std::fs::remove_dir_all(&dir).ok();
}
