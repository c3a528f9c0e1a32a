//! The DeepSeek / Kimi / GLM MoE gating (`zmlx_core::ops::group_expert_select`) against mlx-lm's
//! own `group_expert_select` (run by scripts/oracle_gating.py): on fresh random router logits in
//! bf16, f16 and f32, with and without correction biases, grouped (DeepSeek-V3: 8 groups, 4
//! kept) and not (Kimi-K2, GLM-4.7-Flash), and with many ties (logits from a few levels), the
//! expert ids must come out in mlx-lm's order (the order the experts are summed in) and the
//! weights bit for bit.

mod common;

use common::*;
use zmlx_core::ops::{group_expert_select, GroupGating, SelectOrder};
use zmlx_core::DType;

struct Case {
    dtype: DType,
    gates: Vec<f32>,
    bias: Vec<f32>,
    top_k: usize,
    n_group: usize,
    topk_group: usize,
    scale: f32,
    norm: bool,
}

#[test]
fn gating_matches_mlx_lm_group_expert_select() {
    let mut rng = Lcg(2026_1207);
    let mut uniform = move || rng.next(1 << 30) as f32 / (1u32 << 30) as f32;
    // (experts, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob)
    let configs = [(256, 8, 8, 4, 2.5, true), (384, 8, 1, 1, 2.827, true), (64, 4, 1, 1, 1.8, true), (16, 1, 4, 2, 1.0, false), (32, 6, 4, 3, 1.0, false)];
    let mut cases = Vec::new();
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        for &(e, top_k, n_group, topk_group, scale, norm) in &configs {
            for rep in 0..4 {
                let levels = rep == 3; // a few logit levels: ties in scores and group sums
                let gates = (0..e)
                    .map(|_| dtype.round(if levels { (uniform() * 4.0).floor() - 2.0 } else { (uniform() - 0.5) * 8.0 }))
                    .collect();
                let bias = (0..e).map(|_| if rep == 0 { 0.0 } else if levels { (uniform() * 3.0).floor() * 0.03125 } else { (uniform() - 0.5) * 0.2 }).collect();
                cases.push(Case { dtype, gates, bias, top_k, n_group, topk_group, scale, norm });
            }
        }
    }
    let json: Vec<serde_json::Value> = cases
        .iter()
        .map(|c| {
            serde_json::json!({"dtype": c.dtype.name(), "gates": c.gates, "bias": c.bias, "top_k": c.top_k,
                               "n_group": c.n_group, "topk_group": c.topk_group, "scale": c.scale, "norm": c.norm})
        })
        .collect();
    let want: Vec<(Vec<u32>, Vec<u32>)> = serde_json::from_value(oracle_json("oracle_gating.py", &[], &serde_json::Value::Array(json))).unwrap();
    assert_eq!(want.len(), cases.len());
    let mut order_matters = 0;
    for (i, (c, (want_ids, want_bits))) in cases.iter().zip(&want).enumerate() {
        let gating = GroupGating { top_k: c.top_k, n_group: c.n_group, topk_group: c.topk_group, routed_scaling_factor: c.scale, norm_topk_prob: c.norm };
        let (ids, weights) = group_expert_select(&c.gates, &c.bias, &gating, SelectOrder::Mlx);
        let bits: Vec<u32> = weights.iter().map(|w| w.to_bits()).collect();
        assert_eq!(&ids, want_ids, "case {i} ({} E={} top_k={} groups {}/{}): expert ids or their order", c.dtype, c.gates.len(), c.top_k, c.topk_group, c.n_group);
        assert_eq!(&bits, want_bits, "case {i} ({} E={}): weights", c.dtype, c.gates.len());
        let mut sorted = ids.clone();
        sorted.sort();
        order_matters += (sorted != ids) as usize;
        // The GPU's order (descending score): the same experts, and weights that differ at most
        // by the sum order of the normalisation.
        let (desc_ids, desc_weights) = group_expert_select(&c.gates, &c.bias, &gating, SelectOrder::Descending);
        let mut desc_sorted = desc_ids.clone();
        desc_sorted.sort();
        assert_eq!(desc_sorted, sorted, "case {i}: the descending order selects other experts");
        for (id, w) in desc_ids.iter().zip(&desc_weights) {
            let mlx_w = weights[ids.iter().position(|x| x == id).unwrap()];
            assert!((w - mlx_w).abs() <= 4.0 * f32::EPSILON * mlx_w.abs(), "case {i}: expert {id} weight {w} vs {mlx_w}");
        }
    }
    eprintln!("{} cases equal to mlx-lm, {order_matters} of them with ids not in index order", cases.len());
    assert!(order_matters * 2 >= cases.len(), "only {order_matters} of {} cases test the order", cases.len());
}
