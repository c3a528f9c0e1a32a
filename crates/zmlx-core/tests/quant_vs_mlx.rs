//! MLX affine quantization, bit for bit against MLX itself (the oracle).
//!
//! Runs `scripts/oracle_quant.py` with the Python at `$ZMLX_ORACLE_PYTHON` (default
//! `<workspace>/.venv/bin/python`, which has `mlx-cpu`), then checks every case:
//! - `QuantizedMatrix::quantize(w)` gives MLX's words, scales and biases exactly;
//! - `dequantize` / `dequantize_row` of MLX's own parts equal `mx.dequantize` bitwise;
//! - `matmul_t` of MLX's parts equals `mx.quantized_matmul(transpose=True)` bitwise,
//!   for float32 as well (MLX's x86 `_qmm_t` is plain f32 `sum += x * (s * q + b)` with no
//!   FMA contraction, so no tolerance is needed).
//!
//! A missing oracle is a failure, never a skip.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use safetensors::{Dtype, SafeTensors};
use zmlx_core::dtype::floats_from_le_bytes;
use zmlx_core::{DType, QuantSpec, QuantizedMatrix};

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

fn oracle_python() -> PathBuf {
    let py = match std::env::var_os("ZMLX_ORACLE_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => workspace_root().join(".venv/bin/python"),
    };
    if !py.exists() {
        panic!(
            "MLX oracle Python not found at {} — create the venv (`python -m venv .venv && \
             .venv/bin/pip install mlx-cpu`) or set ZMLX_ORACLE_PYTHON to a Python with mlx",
            py.display()
        );
    }
    py
}

struct Case {
    name: String,
    bits: u32,
    group: usize,
    dtype: DType,
    rows: usize,
    cols: usize,
    m: usize,
}

fn parse_case(prefix: &str) -> Case {
    // case{idx}_b{bits}_g{group}_{dtype}_r{rows}_c{cols}_m{m}
    let parts: Vec<&str> = prefix.split('_').collect();
    assert_eq!(parts.len(), 7, "bad case name {prefix}");
    let num = |s: &str, p: char| -> usize {
        s.strip_prefix(p)
            .unwrap_or_else(|| panic!("bad field {s} in {prefix}"))
            .parse()
            .unwrap()
    };
    let dtype = match parts[3] {
        "float32" => DType::F32,
        "float16" => DType::F16,
        "bfloat16" => DType::BF16,
        d => panic!("bad dtype {d} in {prefix}"),
    };
    Case {
        name: prefix.to_string(),
        bits: num(parts[1], 'b') as u32,
        group: num(parts[2], 'g'),
        dtype,
        rows: num(parts[4], 'r'),
        cols: num(parts[5], 'c'),
        m: num(parts[6], 'm'),
    }
}

fn floats(st: &SafeTensors, name: &str, dtype: DType, shape: &[usize]) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.shape(), shape, "{name} shape");
    let want = match dtype {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        _ => unreachable!(),
    };
    assert_eq!(t.dtype(), want, "{name} dtype");
    floats_from_le_bytes(dtype, t.data()).unwrap()
}

fn words(st: &SafeTensors, name: &str, shape: &[usize]) -> Vec<u32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.shape(), shape, "{name} shape");
    assert_eq!(t.dtype(), Dtype::U32, "{name} dtype");
    t.data()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Index and values of the first bitwise difference, plus the max abs difference.
fn compare(got: &[f32], want: &[f32]) -> (Option<(usize, f32, f32)>, f32) {
    assert_eq!(got.len(), want.len());
    let mut first = None;
    let mut max_abs = 0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if g.to_bits() != w.to_bits() {
            first.get_or_insert((i, g, w));
            max_abs = max_abs.max((g - w).abs());
        }
    }
    (first, max_abs)
}

#[test]
fn quantization_matches_mlx_bit_for_bit() {
    let py = oracle_python();
    let script = workspace_root().join("scripts/oracle_quant.py");
    let dir = std::env::temp_dir().join(format!("zmlx_quant_oracle_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("quant_oracle.safetensors");
    let out = Command::new(&py)
        .arg(&script)
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "failed to run MLX oracle {} {}: {e}",
                py.display(),
                script.display()
            )
        });
    assert!(
        out.status.success(),
        "MLX oracle failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprint!("{}", String::from_utf8_lossy(&out.stdout));
    let bytes = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let st = SafeTensors::deserialize(&bytes).unwrap();

    let mut cases: Vec<Case> = st
        .names()
        .into_iter()
        .filter_map(|n| n.strip_suffix(".w"))
        .map(parse_case)
        .collect();
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(cases.len() >= 54, "oracle wrote only {} cases", cases.len());

    let mut failures = Vec::new();
    let mut combos: BTreeMap<(u32, usize, &'static str), usize> = BTreeMap::new();
    let mut f32_max_abs = 0f32;
    for c in &cases {
        let spec = QuantSpec::new(c.bits, c.group).unwrap();
        let n = &c.name;
        let g = c.cols / c.group;
        let w = floats(&st, &format!("{n}.w"), c.dtype, &[c.rows, c.cols]);
        let wq = words(&st, &format!("{n}.wq"), &[c.rows, spec.packed_cols(c.cols)]);
        let scales = floats(&st, &format!("{n}.scales"), c.dtype, &[c.rows, g]);
        let biases = floats(&st, &format!("{n}.biases"), c.dtype, &[c.rows, g]);
        let deq = floats(&st, &format!("{n}.deq"), c.dtype, &[c.rows, c.cols]);
        let x = floats(&st, &format!("{n}.x"), c.dtype, &[c.m, c.cols]);
        let y = floats(&st, &format!("{n}.y"), c.dtype, &[c.m, c.rows]);

        // quantize
        let q = QuantizedMatrix::quantize(&w, c.rows, c.cols, spec, c.dtype).unwrap();
        if let Some(i) = q.words.iter().zip(&wq).position(|(a, b)| a != b) {
            failures.push(format!(
                "{n}: words differ at {i}: {:#010x} vs MLX {:#010x}",
                q.words[i], wq[i]
            ));
        }
        for (what, got, want) in [
            ("scales", &q.scales, &scales),
            ("biases", &q.biases, &biases),
        ] {
            if let (Some((i, a, b)), _) = compare(got, want) {
                failures.push(format!("{n}: {what} differ at {i}: {a:e} vs MLX {b:e}"));
            }
        }

        // dequantize / matmul from MLX's own parts (independent of our quantize)
        let qm =
            QuantizedMatrix::from_parts(c.rows, c.cols, spec, wq, scales, biases, c.dtype).unwrap();
        if let (Some((i, a, b)), _) = compare(&qm.dequantize(), &deq) {
            failures.push(format!(
                "{n}: dequantize differs at {i}: {a:e} vs MLX {b:e}"
            ));
        }
        for r in [0, c.rows / 2, c.rows - 1] {
            if let (Some((i, a, b)), _) =
                compare(&qm.dequantize_row(r), &deq[r * c.cols..(r + 1) * c.cols])
            {
                failures.push(format!(
                    "{n}: dequantize_row({r}) differs at {i}: {a:e} vs MLX {b:e}"
                ));
            }
        }
        let (diff, max_abs) = compare(&qm.matmul_t(&x, c.m), &y);
        if c.dtype == DType::F32 {
            f32_max_abs = f32_max_abs.max(max_abs);
        }
        if let Some((i, a, b)) = diff {
            failures.push(format!(
                "{n}: matmul_t differs at {i}: {a:e} vs MLX {b:e} (max abs diff {max_abs:e})"
            ));
        }
        *combos.entry((c.bits, c.group, c.dtype.name())).or_default() += 1;
    }
    eprintln!(
        "quant_vs_mlx: checked {} cases ({} bits x group x dtype combos): words, scales, biases, \
         dequantize, quantized_matmul; float32 matmul max abs diff {f32_max_abs:e}",
        cases.len(),
        combos.len()
    );
    assert_eq!(
        combos.len(),
        54,
        "expected all 6 bits x 3 groups x 3 dtypes"
    );
    assert!(
        failures.is_empty(),
        "{} mismatches with MLX:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
