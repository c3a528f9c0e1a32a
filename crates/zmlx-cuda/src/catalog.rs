//! The kernel catalog: every CUDA C source, grouped in modules compiled lazily (one
//! NVRTC call per module, cached on disk).

use zmlx_core::DType;

use crate::{nvrtc, Result};

pub const COMMON: &str = include_str!("kernels/common.cuh");
pub const QMV: &str = include_str!("kernels/qmv.cu");
pub const OPS: &str = include_str!("kernels/ops.cu");
pub const FUSED: &str = include_str!("kernels/fused.cu");
pub const MLX_CPU: &str = include_str!("kernels/mlx_cpu.cu");

pub const QMV_BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];
pub const QMV_GROUPS: [u32; 3] = [32, 64, 128];
pub const QMV_ROWS: [u32; 2] = [1, 4];
/// Head dims with attention kernels (`attn_split_<dt>_d<HD>`, `attn_combine_<dt>_d<HD>`).
pub const ATTN_HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];

/// Short name used in kernel symbols.
pub fn dtype_tag(dt: DType) -> Result<&'static str> {
    match dt {
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        DType::F32 => Ok("f32"),
        other => Err(crate::CudaError::Invalid(format!("dtype {other} has no CUDA kernels (bf16, f16, f32)"))),
    }
}

fn dt_struct(tag: &str) -> &'static str {
    match tag {
        "bf16" => "DtBF16",
        "f16" => "DtF16",
        _ => "DtF32",
    }
}

/// One NVRTC compilation unit.
pub struct ModuleSpec {
    pub name: String,
    pub source: String,
    pub functions: Vec<String>,
}

pub fn qmv_fn_name(tag: &str, bits: u32, gs: u32, r: u32) -> String {
    format!("qmv_{tag}_b{bits}_g{gs}_r{r}")
}

/// The tensor-core (tc4) qmv for 4-bit weights, bf16/f16 only (`ops::uses_tc4`).
pub fn qmv_tc_fn_name(tag: &str, gs: u32) -> String {
    format!("qmv_tc_{tag}_g{gs}")
}

/// The module that holds `function`.
pub fn module_of(function: &str) -> String {
    let tag = ["bf16", "f16", "f32"].into_iter().find(|t| function.contains(&format!("_{t}"))).unwrap_or("f32");
    if function.starts_with("qmv_") {
        format!("qmv_{tag}")
    } else if function.starts_with("fused_") {
        format!("fused_{tag}")
    } else if function.starts_with("mlxcpu_") {
        format!("mlxcpu_{tag}")
    } else {
        format!("ops_{tag}")
    }
}

pub fn module_spec(name: &str) -> Option<ModuleSpec> {
    let (kind, tag) = name.split_once('_')?;
    if !["bf16", "f16", "f32"].contains(&tag) {
        return None;
    }
    let st = dt_struct(tag);
    match kind {
        "qmv" => {
            let mut functions = Vec::new();
            for b in QMV_BITS {
                for g in QMV_GROUPS {
                    for r in QMV_ROWS {
                        functions.push(qmv_fn_name(tag, b, g, r));
                    }
                }
            }
            let mut source = format!("{COMMON}\n{QMV}\nZMLX_QMV_ALL({st}, {tag})\n");
            if tag != "f32" {
                source.push_str(&format!("ZMLX_QMV_TC({st}, {tag})\n"));
                functions.extend(QMV_GROUPS.iter().map(|g| qmv_tc_fn_name(tag, *g)));
            }
            Some(ModuleSpec { name: name.into(), source, functions })
        }
        "ops" => {
            let functions = [
                "rms_norm", "rope", "kv_append", "attn_single", "attn_single_qknr", "attn_split_long", "attn_combine_long", "softmax_topk", "moe_combine",
                "swiglu", "add", "embed", "argmax", "copy_u4",
                // logprobs_argmax, dummy-weight fills, dense matvec
                "lpa_max", "lpa_select", "fill_random_u32", "fill_random_uniform", "affine", "mv_dense", "embed_dense",
                // decode-latency kernels: one-launch q/k norm + rope + append; legacy paths for the tests
                "qk_norm_rope_append", "softmax_topk_legacy",
                // DeepSeek-V3 / Kimi-K2 / GLM-4.x gating
                "group_topk",
                // sampling on the device
                "smp_prep", "smp_radix", "smp_ties", "smp_mass", "smp_pick",
            ]
            .iter()
            .flat_map(|k| match *k {
                "attn_single" | "attn_single_qknr" | "attn_split_long" | "attn_combine_long" => ATTN_HEAD_DIMS.iter().map(|d| format!("{k}_{tag}_d{d}")).collect(),
                "copy_u4" | "fill_random_u32" | "smp_radix" | "smp_ties" | "smp_mass" | "smp_pick" => vec![k.to_string()],
                _ => vec![format!("{k}_{tag}")],
            })
            .collect();
            Some(ModuleSpec { name: name.into(), source: format!("{COMMON}\n{OPS}\nZMLX_OPS({st}, {tag})\n"), functions })
        }
        "fused" => {
            let mut source = format!("{COMMON}\n{QMV}\n{OPS}\n{FUSED}\nZMLX_FUSED_ALL({st}, {tag})\n");
            if tag != "f32" {
                source.push_str(&format!("ZMLX_FUSED_TC({st}, {tag})\n"));
            }
            Some(ModuleSpec { name: name.into(), source, functions: crate::fused::fused_fn_names(tag) })
        }
        "mlxcpu" => {
            let functions = crate::mlx_cpu::KERNELS.iter().map(|k| format!("mlxcpu_{k}_{tag}")).collect();
            Some(ModuleSpec { name: name.into(), source: format!("{COMMON}\n{MLX_CPU}\nZMLX_MLX_CPU({st}, {tag})\n"), functions })
        }
        _ => None,
    }
}

pub fn all_modules() -> Vec<ModuleSpec> {
    ["qmv", "ops", "fused", "mlxcpu"]
        .iter()
        .flat_map(|k| ["bf16", "f16", "f32"].iter().map(move |t| format!("{k}_{t}")))
        .filter_map(|n| module_spec(&n))
        .collect()
}

/// Compile every kernel module with NVRTC for `arch` (e.g. "sm_90"). Needs libnvrtc only,
/// no GPU. Each entry is (module name, Ok(taken from the cache) or the compiler log). Cubins are
/// written to the kernel cache, so a later run on a GPU of that arch starts without JIT. With
/// `use_cache`, a module whose cubin for this exact (source, options, arch) is already cached is
/// not compiled again (it is still checked for every function); otherwise every module is.
/// Errors only when libnvrtc cannot be loaded at all.
pub fn check_all_kernels(arch: &str, use_cache: bool) -> Result<Vec<(String, std::result::Result<bool, String>)>> {
    nvrtc::ensure_nvrtc()?;
    let mut out = Vec::new();
    for m in all_modules() {
        let built = if use_cache { nvrtc::cached_cubin(&m.name, &m.source, arch) } else { nvrtc::fresh_cubin(&m.name, &m.source, arch).map(|c| (c, false)) };
        let res = built.map_err(|e| e.to_string()).and_then(|(cubin, cached)| {
            let missing: Vec<&String> = m.functions.iter().filter(|f| !contains(&cubin, f.as_bytes())).collect();
            if !missing.is_empty() {
                return Err(format!("cubin lacks functions {missing:?}"));
            }
            Ok(cached)
        });
        out.push((m.name.clone(), res));
    }
    Ok(out)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    // symbol names are NUL-terminated in the string table
    let mut n = needle.to_vec();
    n.push(0);
    hay.windows(n.len()).any(|w| w == n.as_slice())
}
