//! zmlx-core ops against MLX's CPU results, bit for bit.
//!
//! Runs `scripts/oracle_ops.py` (python from `ZMLX_ORACLE_PYTHON`, default
//! `<workspace>/.venv/bin/python`, with mlx + mlx-lm installed; optional seed from
//! `ZMLX_ORACLE_SEED`) and compares every case. bf16/f16 results and f32
//! elementwise / softmax / logsumexp / rms_norm / rope / sum results must match
//! bitwise; integer results (argmax, argpartition order) exactly. Only f32 matmul
//! and f32 sdpa get a tolerance, because MLX hands f32 gemms to BLAS (see
//! `check_f32_close`). Run with `-- --nocapture` to see the per-op summary.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Command;

use safetensors::{Dtype, SafeTensors};
use zmlx_core::dtype::floats_from_le_bytes;
use zmlx_core::{mlx_math, ops, DType};

struct Tensor {
    shape: Vec<usize>,
    f: Vec<f32>,
    u: Vec<u32>,
}

type Case = HashMap<String, Tensor>;

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run_oracle() -> Vec<u8> {
    let root = workspace_root();
    let python = std::env::var("ZMLX_ORACLE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join(".venv/bin/python"));
    assert!(
        python.exists(),
        "oracle python {} not found: set ZMLX_ORACLE_PYTHON to a python with mlx and mlx-lm \
         (or create <workspace>/.venv); this test cannot run without the MLX oracle",
        python.display()
    );
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("ops_vs_mlx.{}.safetensors", std::process::id()));
    let mut cmd = Command::new(&python);
    cmd.arg(root.join("scripts/oracle_ops.py")).arg(&out);
    if let Ok(seed) = std::env::var("ZMLX_ORACLE_SEED") {
        cmd.arg(seed);
    }
    let res = cmd.output().unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    assert!(
        res.status.success(),
        "oracle_ops.py failed ({}):\n{}\n{}",
        res.status,
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
    println!("{}", String::from_utf8_lossy(&res.stdout).trim());
    let bytes = std::fs::read(&out).expect("read oracle output");
    let _ = std::fs::remove_file(&out);
    bytes
}

/// Cases grouped as op -> params string -> field -> tensor.
fn load(bytes: &[u8]) -> BTreeMap<String, BTreeMap<String, Case>> {
    let st = SafeTensors::deserialize(bytes).expect("parse safetensors");
    let mut out: BTreeMap<String, BTreeMap<String, Case>> = BTreeMap::new();
    for (name, view) in st.iter() {
        let mut parts = name.splitn(3, '/');
        let (op, params, field) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
        let data = view.data();
        let (f, u) = match view.dtype() {
            Dtype::F32 => (floats_from_le_bytes(DType::F32, data).unwrap(), vec![]),
            Dtype::F16 => (floats_from_le_bytes(DType::F16, data).unwrap(), vec![]),
            Dtype::BF16 => (floats_from_le_bytes(DType::BF16, data).unwrap(), vec![]),
            Dtype::U32 => (vec![], data.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
            d => panic!("{name}: unexpected dtype {d:?}"),
        };
        out.entry(op.to_string())
            .or_default()
            .entry(params.to_string())
            .or_default()
            .insert(field.to_string(), Tensor { shape: view.shape().to_vec(), f, u });
    }
    out
}

fn parse_params(s: &str) -> HashMap<String, String> {
    s.split(',')
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("k=v");
            (k.to_string(), v.to_string())
        })
        .collect()
}

struct P(HashMap<String, String>);

impl P {
    fn get<T: std::str::FromStr>(&self, k: &str) -> T {
        self.0[k].parse().unwrap_or_else(|_| panic!("param {k}={}", self.0[k]))
    }
    fn dtype(&self) -> DType {
        match self.0["dtype"].as_str() {
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            "f32" => DType::F32,
            d => panic!("dtype {d}"),
        }
    }
}

#[derive(Default)]
struct Stats {
    cases: usize,
    elems: usize,
    mismatches: usize,
    bad_cases: usize,
    max_err: f64,
    bit_diffs: usize,
    note: &'static str,
    examples: Vec<String>,
}

impl Stats {
    fn record(&mut self, case: &str, n: usize, bad: Vec<String>, bad_count: usize) {
        self.cases += 1;
        self.elems += n;
        self.mismatches += bad_count;
        if bad_count > 0 {
            self.bad_cases += 1;
        }
        for b in bad {
            if self.examples.len() < 6 {
                self.examples.push(format!("[{case}] {b}"));
            }
        }
    }
}

/// Bitwise equality of f32 carriers (NaN == NaN, whatever the payload).
fn same_bits(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// Bitwise comparison; `inputs(i)` describes element i for the report.
fn check_bits(st: &mut Stats, case: &str, ours: &[f32], mlx: &[f32], inputs: impl Fn(usize) -> String) {
    assert_eq!(ours.len(), mlx.len(), "{case}: length");
    let mut bad = vec![];
    let mut count = 0;
    for i in 0..ours.len() {
        if !same_bits(ours[i], mlx[i]) {
            count += 1;
            if bad.len() < 3 {
                bad.push(format!("#{i} {}: ours {:e} ({:#010x}) mlx {:e} ({:#010x})", inputs(i), ours[i], ours[i].to_bits(), mlx[i], mlx[i].to_bits()));
            }
        }
    }
    st.record(case, ours.len(), bad, count);
}

fn check_u32(st: &mut Stats, case: &str, ours: &[u32], mlx: &[u32], row: usize) {
    assert_eq!(ours.len(), mlx.len(), "{case}: length");
    let mut bad = vec![];
    let mut count = 0;
    for (r, (a, b)) in ours.chunks(row).zip(mlx.chunks(row)).enumerate() {
        if a != b {
            count += 1;
            if bad.len() < 2 {
                bad.push(format!("row {r}: ours {a:?} mlx {b:?}"));
            }
        }
    }
    st.record(case, ours.len() / row, bad, count);
}

/// f32 gemms (and so f32 sdpa) are `cblas_sgemm` calls in MLX, not its own
/// loop. The Linux mlx-cpu wheel bundles netlib's reference BLAS, whose sgemm
/// accumulates in k order like ours, and there the results are bitwise equal
/// (the summary reports the bitwise mismatch count). An optimised BLAS
/// (OpenBLAS, Accelerate, MKL) blocks, vectorises and uses FMA, so it can
/// differ in the last bits; the pass/fail gate is therefore a tight relative
/// tolerance: each element within `rel * scale[i]`, where `scale[i]` bounds
/// the size of the terms that made it (the natural error scale of a float dot
/// product).
fn check_f32_close(st: &mut Stats, case: &str, ours: &[f32], mlx: &[f32], scale: &[f32], rel: f64) {
    let mut bad = vec![];
    let mut count = 0;
    for i in 0..ours.len() {
        if !same_bits(ours[i], mlx[i]) {
            st.bit_diffs += 1;
        }
        let err = (ours[i] as f64 - mlx[i] as f64).abs();
        let rel_err = err / (scale[i] as f64).max(f32::MIN_POSITIVE as f64);
        st.max_err = st.max_err.max(rel_err);
        if !(rel_err <= rel) {
            count += 1;
            if bad.len() < 3 {
                bad.push(format!("#{i}: ours {:e} mlx {:e} rel {rel_err:e} > {rel:e}", ours[i], mlx[i]));
            }
        }
    }
    st.record(case, ours.len(), bad, count);
}

/// Error scale of f32 sdpa outputs `[hq, l, d]`: an error δ in the scores moves
/// the output by about `sum_j p_j |v_jc| * 2 max δ`, and the scores' own error
/// scale is `sum_c |scale q_c k_jc|`; the PV gemm adds `sum_j p_j |v_jc|`.
fn sdpa_error_scale(q: &[f32], k: &[f32], v: &[f32], hq: usize, hkv: usize, l: usize, d: usize, scale: f32, causal: bool) -> Vec<f32> {
    let s = k.len() / (hkv * d);
    let mut out = vec![0.0f32; hq * l * d];
    for h in 0..hq {
        let kv = h / (hq / hkv);
        for i in 0..l {
            let qr = &q[(h * l + i) * d..(h * l + i + 1) * d];
            let visible = if causal { s - l + i + 1 } else { s };
            let krow = |j: usize| &k[(kv * s + j) * d..(kv * s + j + 1) * d];
            let mut p: Vec<f32> = (0..visible).map(|j| qr.iter().zip(krow(j)).map(|(a, b)| scale * a * b).sum()).collect();
            let score_scale = (0..visible)
                .map(|j| qr.iter().zip(krow(j)).map(|(a, b)| (scale * a * b).abs()).sum::<f32>())
                .fold(0.0f32, f32::max);
            ops::softmax_precise(&mut p, DType::F32);
            for c in 0..d {
                let pv: f32 = (0..visible).map(|j| p[j] * v[(kv * s + j) * d + c].abs()).sum();
                out[(h * l + i) * d + c] = pv * (1.0 + 2.0 * score_scale);
            }
        }
    }
    out
}

#[test]
fn ops_match_mlx() {
    let bytes = run_oracle();
    let all = load(&bytes);
    let mut summary: BTreeMap<String, Stats> = BTreeMap::new();

    for (op, cases) in &all {
        for (params, c) in cases {
            let p = P(parse_params(params));
            let dt = p.dtype();
            let key = format!("{op} {}", p.0["dtype"]);
            let st = summary.entry(key).or_default();
            let case = format!("{op}/{params}");
            match op.as_str() {
                "exp" | "sin" | "cos" => {
                    let x = &c["x"].f;
                    let f = match op.as_str() {
                        "exp" => mlx_math::exp,
                        "sin" => mlx_math::sin,
                        _ => mlx_math::cos,
                    };
                    let ours: Vec<f32> = x.iter().map(|&v| f(v)).collect();
                    check_bits(st, &case, &ours, &c["y"].f, |i| format!("x={:e}", x[i]));
                }
                "sigmoid" | "silu" => {
                    let x = &c["x"].f;
                    let f = if op == "sigmoid" { mlx_math::sigmoid } else { mlx_math::silu };
                    let ours: Vec<f32> = x.iter().map(|&v| f(dt, v)).collect();
                    check_bits(st, &case, &ours, &c["y"].f, |i| format!("x={:e}", x[i]));
                }
                "swiglu" => {
                    let (g, u) = (&c["gate"].f, &c["up"].f);
                    let ours: Vec<f32> = g.iter().zip(u).map(|(&a, &b)| mlx_math::swiglu(dt, a, b)).collect();
                    check_bits(st, &case, &ours, &c["y"].f, |i| format!("gate={:e} up={:e}", g[i], u[i]));
                }
                "rms_norm" => {
                    let eps: f32 = p.get("eps");
                    let ours = ops::rms_norm(&c["x"].f, &c["w"].f, eps, dt);
                    let d = c["w"].f.len();
                    check_bits(st, &case, &ours, &c["y"].f, |i| format!("row {} col {}", i / d, i % d));
                }
                "rope" => {
                    let (d, l, off): (usize, usize, usize) = (p.get("D"), p.get("L"), p.get("off"));
                    let base: f32 = p.get("base");
                    let (coss, sins) = ops::rope_tables(d, base, 1.0, off, l, dt);
                    let mut x = c["x"].f.clone();
                    ops::rope_apply(&mut x, d, d, l, &coss, &sins, dt);
                    check_bits(st, &case, &x, &c["y"].f, |i| format!("head {} t {} j {}", i / (l * d), (i / d) % l, i % d));
                }
                "softmax" | "logsumexp" | "argmax" => {
                    let x = &c["x"].f;
                    let cols = *c["x"].shape.last().unwrap();
                    match op.as_str() {
                        "softmax" => {
                            let mut ours = x.clone();
                            for row in ours.chunks_exact_mut(cols) {
                                ops::softmax_precise(row, dt);
                            }
                            check_bits(st, &case, &ours, &c["y"].f, |i| format!("row {} col {}", i / cols, i % cols));
                        }
                        "logsumexp" => {
                            let ours: Vec<f32> = x.chunks_exact(cols).map(|r| ops::logsumexp(r, dt)).collect();
                            check_bits(st, &case, &ours, &c["y"].f, |i| format!("row {i}"));
                        }
                        _ => {
                            let ours: Vec<u32> = x.chunks_exact(cols).map(|r| ops::argmax(r) as u32).collect();
                            check_u32(st, &case, &ours, &c["y"].u, 1);
                        }
                    }
                }
                "argpartition" => {
                    let (e, k): (usize, usize) = (p.get("E"), p.get("k"));
                    let ours: Vec<u32> = c["g"].f.chunks_exact(e).flat_map(|r| ops::argpartition(r, e - k)).collect();
                    check_u32(st, &case, &ours, &c["inds"].u, e);
                }
                "sdpa" => {
                    let (d, hq, hkv, l): (usize, usize, usize, usize) = (p.get("D"), p.get("Hq"), p.get("Hkv"), p.get("L"));
                    let causal = p.get::<u32>("causal") == 1;
                    // Python's `D ** -0.5` (a double) passed to MLX as a float.
                    let scale = (d as f64).powf(-0.5) as f32;
                    let (q, k, v) = (&c["q"].f, &c["k"].f, &c["v"].f);
                    let ours = ops::sdpa(q, k, v, hq, hkv, l, d, scale, causal, dt);
                    if dt == DType::F32 {
                        st.note = "f32: BLAS gemms, rel tol 1e-5";
                        let scale_v = sdpa_error_scale(q, k, v, hq, hkv, l, d, scale, causal);
                        check_f32_close(st, &case, &ours, &c["o"].f, &scale_v, 1e-5);
                    } else {
                        check_bits(st, &case, &ours, &c["o"].f, |i| format!("head {} q {} c {}", i / (l * d), (i / d) % l, i % d));
                    }
                }
                "matmul" => {
                    let kd: usize = p.get("K");
                    let (x, w) = (&c["x"].f, &c["w"].f);
                    let ours = ops::matmul_t(x, w, kd, dt);
                    let n = w.len() / kd;
                    if dt == DType::F32 {
                        st.note = "f32: BLAS sgemm, rel tol 1e-5";
                        let scale: Vec<f32> = x
                            .chunks_exact(kd)
                            .flat_map(|xr| w.chunks_exact(kd).map(move |wr| xr.iter().zip(wr).map(|(a, b)| (a * b).abs()).sum::<f32>()))
                            .collect();
                        check_f32_close(st, &case, &ours, &c["y"].f, &scale, 1e-5);
                    } else {
                        check_bits(st, &case, &ours, &c["y"].f, |i| format!("row {} col {}", i / n, i % n));
                    }
                }
                "sum_axis0" => {
                    let (k, d): (usize, usize) = (p.get("k"), p.get("D"));
                    let x = &c["x"].f;
                    let ours: Vec<f32> = (0..d).map(|j| ops::sum_in_dtype((0..k).map(|r| x[r * d + j]), dt)).collect();
                    check_bits(st, &case, &ours, &c["y"].f, |j| format!("col {j}"));
                }
                "sum_last" => {
                    let cols: usize = p.get("C");
                    let ours: Vec<f32> = c["x"].f.chunks_exact(cols).map(|r| ops::sum_in_dtype(r.iter().copied(), dt)).collect();
                    check_bits(st, &case, &ours, &c["y"].f, |r| format!("row {r}"));
                }
                other => panic!("unknown op {other}"),
            }
        }
    }

    println!("{:<22} {:>6} {:>9} {:>10} {:>9}  {}", "op", "cases", "elements", "mismatch", "badcases", "note");
    let mut failed = false;
    for (k, s) in &summary {
        let note = if s.note.is_empty() { "bitwise".to_string() } else { format!("{} (max rel err {:.2e}, {} not bitwise)", s.note, s.max_err, s.bit_diffs) };
        println!("{:<22} {:>6} {:>9} {:>10} {:>9}  {}", k, s.cases, s.elems, s.mismatches, s.bad_cases, note);
        for e in &s.examples {
            println!("    {e}");
        }
        failed |= s.mismatches > 0;
    }
    assert!(!failed, "zmlx ops differ from MLX (see the summary above)");
}
