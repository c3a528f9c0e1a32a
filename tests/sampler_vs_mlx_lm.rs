//! The sampler's filters against mlx-lm's own (`mlx_lm.sample_utils.apply_top_p`,
//! `apply_min_p`, `apply_top_k`, run by scripts/oracle_sampler.py in make_sampler's order): on
//! fresh random logprobs in bf16, f16 and f32, the set of tokens `zmlx_core::sampling` keeps
//! is the set mlx-lm leaves finite. Where mlx-lm's own arithmetic leaves the answer open, the
//! case is not compared: a top-p boundary within 1e-4 of the mass (mlx-lm sums f32 in sort
//! order, zmlx fixed-point weights), and top-k with a tie at the k-th value (argpartition
//! breaks ties in no specified order). Every comparable case must match, and most must be
//! comparable.

mod common;

use common::*;
use zmlx_core::sampling::{kept_tokens, SampleParams};
use zmlx_core::DType;

struct Case {
    dtype: DType,
    logprobs: Vec<f32>,
    params: SampleParams,
}

/// Whether mlx-lm's answer is fixed by the values alone (see the module comment).
fn comparable(c: &Case) -> bool {
    let n = c.logprobs.len();
    let mut desc = c.logprobs.clone();
    desc.sort_by(|a, b| b.total_cmp(a));
    let m = desc[0] as f64;
    let p = &c.params;
    if p.top_p > 0.0 && p.top_p < 1.0 {
        let e: Vec<f64> = desc.iter().map(|&v| (v as f64 - m).exp()).collect();
        let total: f64 = e.iter().sum();
        let target = p.top_p as f64 * total;
        let mut cum = 0.0;
        for v in &e {
            let next = cum + v;
            if (cum - target).abs() < 1e-4 * total || (next - target).abs() < 1e-4 * total {
                return false;
            }
            if next >= target {
                break;
            }
            cum = next;
        }
    }
    if p.top_k > 0 && p.top_k < n && desc[p.top_k - 1] == desc[p.top_k] {
        return false;
    }
    true
}

#[test]
fn kept_tokens_match_mlx_lm_filters() {
    let mut rng = Lcg(2026_1206);
    let mut uniform = move || rng.next(1 << 30) as f64 / (1u64 << 30) as f64;
    let mut cases = Vec::new();
    let settings: [(f32, f32, usize); 9] = [
        (0.9, 0.0, 0),
        (0.5, 0.0, 0),
        (1.0, 0.05, 0),
        (1.0, 0.2, 0),
        (0.95, 0.1, 0),
        (1.0, 0.0, 40),
        (0.9, 0.0, 25),
        (1.0, 0.02, 50),
        (0.8, 0.05, 10),
    ];
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        for (s, &(top_p, min_p, top_k)) in settings.iter().enumerate() {
            for rep in 0..4 {
                // Logprobs like a model's: a few strong candidates over a long tail, spread
                // differently per case so the filters cut at different places.
                let n = 500 + 97 * s + 31 * rep;
                let spread = 1.0 + 3.0 * uniform();
                let logprobs: Vec<f32> = (0..n)
                    .map(|i| {
                        let head = if i % 53 == 7 { 4.0 * uniform() } else { 0.0 };
                        dtype.round((-(spread * -uniform().max(1e-12).ln()) * 2.0 + head - 3.0) as f32)
                    })
                    .collect();
                cases.push(Case { dtype, logprobs, params: SampleParams { temp: 1.0, top_p, top_k, min_p } });
            }
        }
    }
    let json: Vec<serde_json::Value> = cases
        .iter()
        .map(|c| {
            serde_json::json!({"dtype": c.dtype.name(), "logprobs": c.logprobs, "top_p": c.params.top_p,
                               "min_p": c.params.min_p, "top_k": c.params.top_k})
        })
        .collect();
    let want: Vec<Vec<usize>> = serde_json::from_value(oracle_json("oracle_sampler.py", &[], &serde_json::Value::Array(json))).unwrap();
    assert_eq!(want.len(), cases.len());
    let (mut compared, mut filtered) = (0, 0);
    for (i, (c, w)) in cases.iter().zip(&want).enumerate() {
        if !comparable(c) {
            continue;
        }
        let kept = kept_tokens(&c.logprobs, c.dtype, &c.params).unwrap();
        let ours: Vec<usize> = (0..kept.len()).filter(|&t| kept[t]).collect();
        assert_eq!(&ours, w, "case {i} ({} {:?}): kept {} tokens, mlx-lm {}", c.dtype, c.params, ours.len(), w.len());
        compared += 1;
        filtered += (ours.len() < c.logprobs.len()) as usize;
    }
    eprintln!("compared {compared} of {} cases, {filtered} removed tokens", cases.len());
    assert!(compared * 10 >= cases.len() * 7, "only {compared} of {} cases were comparable", cases.len());
    assert!(filtered * 10 >= compared * 9, "only {filtered} of {compared} cases removed tokens: a weak test");
}
