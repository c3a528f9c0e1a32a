//! `patch`: swap chains of small ops for fused kernels, block by block, only where the
//! output stays token-identical. A pattern is on for a model when its family preset
//! enables it, the options keep it, and its safety rules accept each block.

use std::collections::BTreeMap;
use std::fmt;

/// The fusions zmlx knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pattern {
    /// Router matvec → softmax → top-k → normalisation, one launch.
    MoeGating,
    /// Gate and up projections of the k selected experts + SiLU(gate)·up, one launch.
    GatherQmmSwiglu,
    /// Down projection of the k experts + weighted sum + residual add, one launch.
    GatherQmmCombine,
    /// The whole MoE block at decode in three launches (the three above together).
    MoeMlp,
    /// gather_qmm_swiglu + gather_qmm_combine as ONE launch (a persistent grid with a grid-wide
    /// barrier; the down weights arrive in shared memory while gate/up run).
    MoeExperts,
    /// Dense SwiGLU MLP: gate + up + SiLU·mul in one pass.
    SwigluMlp,
    /// Residual add + RMSNorm, one launch.
    AddRmsNorm,
    /// Per-head q/k RMSNorm + RoPE + KV-cache append, one launch.
    QkNormRope,
    /// The q, k and v projections in one launch.
    QkvProj,
    /// Attention output projection + residual add, one launch.
    OProjAdd,
    /// Post-attention RMSNorm + router matvec, one launch (the top-k stays separate).
    NormRouter,
    /// Softmax + top-k + renorm computed inside gather_qmm_swiglu and gather_qmm_combine from
    /// the router's logits: no top-k launch (the MoE block is router + 2 launches).
    MoeTopkExperts,
}

pub const ALL_PATTERNS: [Pattern; 12] = [
    Pattern::MoeMlp,
    Pattern::MoeExperts,
    Pattern::MoeGating,
    Pattern::GatherQmmSwiglu,
    Pattern::GatherQmmCombine,
    Pattern::SwigluMlp,
    Pattern::AddRmsNorm,
    Pattern::QkNormRope,
    Pattern::QkvProj,
    Pattern::OProjAdd,
    Pattern::NormRouter,
    Pattern::MoeTopkExperts,
];

impl Pattern {
    pub fn name(self) -> &'static str {
        match self {
            Pattern::MoeGating => "moe_gating",
            Pattern::GatherQmmSwiglu => "gather_qmm_swiglu",
            Pattern::GatherQmmCombine => "gather_qmm_combine",
            Pattern::MoeMlp => "moe_mlp",
            Pattern::MoeExperts => "moe_experts",
            Pattern::SwigluMlp => "swiglu_mlp",
            Pattern::AddRmsNorm => "add_rms_norm",
            Pattern::QkNormRope => "qk_norm_rope",
            Pattern::QkvProj => "qkv_proj",
            Pattern::OProjAdd => "o_proj_add",
            Pattern::NormRouter => "norm_router",
            Pattern::MoeTopkExperts => "moe_topk_experts",
        }
    }

    pub fn fuses(self) -> &'static str {
        match self {
            Pattern::MoeGating => "router qmv + softmax + top-k + renorm",
            Pattern::GatherQmmSwiglu => "expert gate qmv + up qmv + swiglu (k experts)",
            Pattern::GatherQmmCombine => "expert down qmv + weighted sum + residual add",
            Pattern::MoeMlp => "moe_gating + gather_qmm_swiglu + gather_qmm_combine",
            Pattern::MoeExperts => "gather_qmm_swiglu + gather_qmm_combine in one launch (grid barrier)",
            Pattern::SwigluMlp => "dense gate + up + swiglu",
            Pattern::AddRmsNorm => "residual add + rms_norm",
            Pattern::QkNormRope => "q/k rms_norm + rope + kv append",
            Pattern::QkvProj => "q, k, v projections (one qmv launch)",
            Pattern::OProjAdd => "attention o_proj qmv + residual add",
            Pattern::NormRouter => "post-attention rms_norm + router qmv",
            Pattern::MoeTopkExperts => "softmax + top-k + renorm into gather_qmm_swiglu / gather_qmm_combine",
        }
    }

    pub fn parse(s: &str) -> Option<Pattern> {
        ALL_PATTERNS.into_iter().find(|p| p.name() == s)
    }

    /// The elementary patterns a pattern stands for.
    pub fn expand(self) -> Vec<Pattern> {
        match self {
            Pattern::MoeMlp => vec![Pattern::MoeGating, Pattern::GatherQmmSwiglu, Pattern::GatherQmmCombine],
            p => vec![p],
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the user asked for (`--patterns`, `--exclude`, `--no-patch`).
#[derive(Clone, Debug, Default)]
pub struct PatchOptions {
    /// Replace the family preset with these.
    pub patterns: Option<Vec<Pattern>>,
    pub exclude: Vec<Pattern>,
    pub no_patch: bool,
}

impl PatchOptions {
    pub fn none() -> Self {
        PatchOptions { no_patch: true, ..Default::default() }
    }

    /// Parse `--patterns a,b` / `--exclude c`; unknown names are an error naming them.
    pub fn parse(patterns: Option<&str>, exclude: Option<&str>, no_patch: bool) -> Result<Self, String> {
        let list = |s: &str| -> Result<Vec<Pattern>, String> {
            s.split(',')
                .filter(|t| !t.trim().is_empty())
                .map(|t| {
                    Pattern::parse(t.trim()).ok_or_else(|| {
                        format!("unknown pattern `{}` (known: {})", t.trim(), ALL_PATTERNS.map(|p| p.name()).join(", "))
                    })
                })
                .collect()
        };
        Ok(PatchOptions { patterns: patterns.map(list).transpose()?, exclude: exclude.map(list).transpose()?.unwrap_or_default(), no_patch })
    }
}

/// Which backend the patched model runs on (kernels and fidelity differ per backend).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    Cuda,
}

/// A pattern's default for a family and backend, and why.
pub struct PresetEntry {
    pub pattern: Pattern,
    pub on: bool,
    pub why: &'static str,
}

/// The family preset: every pattern with on/off and the reason.
pub fn preset(model_type: &str, backend: Backend) -> Vec<PresetEntry> {
    use Pattern::*;
    let family_ok = model_type == "qwen3_moe";
    ALL_PATTERNS
        .into_iter()
        .map(|pattern| {
            let (on, why) = match (family_ok, backend, pattern) {
                (false, _, _) => (false, "no preset for this family yet"),
                (true, Backend::Cpu, MoeGating) => (false, "CPU: routing is already a single pass; nothing to fuse"),
                (true, Backend::Cuda, MoeGating) => (false, "identical, but slower on H100: decode 406 vs 412 tok/s (the kernel alone: 5.2 us as one thread block cluster vs 5.5 for qmv + softmax_topk; launches overlap, so the saved one buys little)"),
                (true, Backend::Cuda, AddRmsNorm) => (false, "identical, but measured slower on H100 (4.0 vs 2.5 us for add + rms_norm, docs/kernels.md)"),
                (true, Backend::Cpu, MoeExperts) => (false, "CPU: the same values as gather_qmm_swiglu + gather_qmm_combine; no launches to save"),
                (true, Backend::Cuda, MoeExperts) => (false, "identical, but slower on H100: 18.7 vs 16.8 us for the two launches, decode 385-398 vs 416-420 tok/s (the tc4 down rows alone take 3.7 us after the grid barrier, docs/kernels.md)"),
                (true, _, MoeMlp) => (true, "as gather_qmm_swiglu + gather_qmm_combine: its moe_gating part stays off (see that line)"),
                (true, _, GatherQmmSwiglu | GatherQmmCombine | SwigluMlp | AddRmsNorm) => {
                    (true, "bitwise identical to the unfused chain (tested on random inputs and on every fixture)")
                }
                (true, Backend::Cpu, QkNormRope) => (true, "the same per-row ops in one pass (no transposed copies); bitwise identical on every fixture; speed-neutral on the tiny fixtures"),
                (true, Backend::Cpu, QkvProj) => (false, "CPU: three matmuls over one input; nothing to fuse"),
                (true, Backend::Cuda, QkNormRope) => (true, "bitwise identical to the 5-launch chain; runs as the single-launch attention kernel's prologue up to 160 positions (one launch less per layer; ATT_QK_PROLOGUE_MAX_LEN), else its own launch: 2.8 vs 6.6 us on H100"),
                (true, Backend::Cuda, QkvProj) => (true, "bitwise identical to three qmv; 6.2 vs 8.6 us on H100"),
                (true, Backend::Cpu, OProjAdd) => (false, "CPU: the add is one pass over the hidden vector; nothing to fuse"),
                (true, Backend::Cpu, NormRouter) => (false, "CPU: nothing to fuse"),
                (true, Backend::Cuda, NormRouter) => (false, "identical, but slower on H100: 8.3 vs 7.3 us with the top-k (every block repeats the norm before its router rows)"),
                (true, Backend::Cuda, OProjAdd) => (true, "bitwise identical to qmv then add; 5.05 vs 5.60 us on H100"),
                (true, Backend::Cpu, MoeTopkExperts) => (false, "CPU: routing is already a single pass; nothing to fuse"),
                (true, Backend::Cuda, MoeTopkExperts) => (false, "identical, but slower on H100: decode 391 vs 425 tok/s; each block routes itself (~2 us of one warp) and the expert kernels run in 1-2 waves: swiglu 14.4 vs 9.3 us, combine 9.6 vs 7.2, vs 3.2 for the top-k launch"),
            };
            PresetEntry { pattern, on, why }
        })
        .collect()
}

/// The elementary patterns to apply for a model: preset (or `--patterns`) minus `--exclude`.
pub fn plan(model_type: &str, backend: Backend, opts: &PatchOptions) -> Vec<Pattern> {
    if opts.no_patch {
        return vec![];
    }
    let entries = preset(model_type, backend);
    let (chosen, mut excluded): (Vec<Pattern>, Vec<Pattern>) = match &opts.patterns {
        Some(list) => (list.clone(), vec![]),
        // A composite in the preset does not switch on its parts that the preset keeps off.
        None => (entries.iter().filter(|e| e.on).map(|e| e.pattern).collect(), entries.iter().filter(|e| !e.on).map(|e| e.pattern).collect()),
    };
    excluded.extend(opts.exclude.iter().flat_map(|p| p.expand()));
    let mut out: Vec<Pattern> = chosen.into_iter().flat_map(|p| p.expand()).filter(|p| !excluded.contains(p)).collect();
    out.sort();
    out.dedup();
    out
}

/// What `patch` did: modules switched per pattern, and blocks a pattern skipped, with why.
#[derive(Clone, Debug, Default)]
pub struct PatchReport {
    pub counts: BTreeMap<String, usize>,
    pub skipped: Vec<String>,
}

impl PatchReport {
    pub fn add(&mut self, name: &str) {
        *self.counts.entry(name.to_string()).or_default() += 1;
    }

    pub fn skip(&mut self, pattern: Pattern, what: String) {
        self.skipped.push(format!("{pattern}: {what}"));
    }

    /// Modules patched (a MoE block with all three MoE fusions counts once, as `moe_mlp`).
    pub fn total(&self) -> usize {
        self.counts.values().sum()
    }

    pub fn patterns(&self) -> Vec<String> {
        self.counts.keys().cloned().collect()
    }
}

impl fmt::Display for PatchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
        write!(f, "Patched {} modules: {}", self.total(), if parts.is_empty() { "none".into() } else { parts.join(" ") })
    }
}

/// Per-block switches that `patch` sets and the forward passes read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MoeVariant {
    pub fused_gating: bool,
    pub fused_swiglu: bool,
    pub fused_combine: bool,
    /// The experts (gate/up/swiglu and down/combine) as one launch: `moe_experts` (CUDA; the
    /// CPU computes the same values as with fused_swiglu and fused_combine).
    pub one_launch: bool,
    /// Softmax + top-k inside the two expert kernels (`moe_topk_experts`, CUDA).
    pub routed: bool,
}

impl MoeVariant {
    /// Record this block in the report under its most specific name.
    pub fn report(&self, r: &mut PatchReport) {
        if self.one_launch {
            r.add("moe_experts");
            if self.fused_gating {
                r.add("moe_gating");
            }
            return;
        }
        if self.routed {
            r.add("moe_topk_experts");
        }
        match (self.fused_gating, self.fused_swiglu, self.fused_combine) {
            (true, true, true) => r.add("moe_mlp"),
            _ => {
                if self.fused_gating {
                    r.add("moe_gating");
                }
                if self.fused_swiglu {
                    r.add("gather_qmm_swiglu");
                }
                if self.fused_combine {
                    r.add("gather_qmm_combine");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_expands_and_excludes() {
        let all = plan("qwen3_moe", Backend::Cuda, &PatchOptions::default());
        assert!(all.contains(&Pattern::GatherQmmSwiglu) && !all.contains(&Pattern::MoeMlp) && all.contains(&Pattern::QkNormRope));
        assert!(!all.contains(&Pattern::MoeGating), "moe_mlp must not switch on a part the preset keeps off");
        let opts = PatchOptions::parse(Some("moe_mlp,add_rms_norm"), Some("moe_gating"), false).unwrap();
        assert_eq!(plan("qwen3_moe", Backend::Cpu, &opts), vec![Pattern::GatherQmmSwiglu, Pattern::GatherQmmCombine, Pattern::AddRmsNorm]);
        assert!(plan("qwen3_moe", Backend::Cpu, &PatchOptions::none()).is_empty());
        assert!(plan("llama", Backend::Cpu, &PatchOptions::default()).is_empty());
        assert!(PatchOptions::parse(Some("moe_mlp,bogus"), None, false).unwrap_err().contains("bogus"));
    }
}
