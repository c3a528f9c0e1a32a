//! Qwen3-MoE (`model_type: qwen3_moe`), as mlx_lm/models/qwen3_moe.py computes it.

use serde::Deserialize;
use zmlx_core::{ops, DType};

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::nn::{self, Embedding, KvCache, Linear, Loader, Mlp, RmsNorm, Rope, SwitchGlu};
use crate::patch::{MoeVariant, PatchReport, Pattern};

#[derive(Clone, Debug, Deserialize)]
pub struct ModelArgs {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub decoder_sparse_step: usize,
    #[serde(default)]
    pub mlp_only_layers: Vec<usize>,
    pub moe_intermediate_size: usize,
    pub rms_norm_eps: f32,
    pub vocab_size: usize,
    pub num_key_value_heads: usize,
    pub head_dim: Option<usize>,
    pub rope_theta: f32,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub norm_topk_prob: bool,
}

impl ModelArgs {
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// mlx-lm's rule for which layers get the sparse MoE block.
    pub fn is_sparse_layer(&self, i: usize) -> bool {
        !self.mlp_only_layers.contains(&i) && self.num_experts > 0 && (i + 1) % self.decoder_sparse_step == 0
    }

    pub fn validate(&self, config: &ModelConfig) -> Result<()> {
        let bad = |msg: String| Err(ModelError::file(&config.path, msg));
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 || self.num_attention_heads % self.num_key_value_heads != 0 {
            return bad(format!("num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})", self.num_attention_heads, self.num_key_value_heads));
        }
        if self.num_experts > 0 && (self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_experts) {
            return bad(format!("num_experts_per_tok ({}) must be in 1..={} (num_experts)", self.num_experts_per_tok, self.num_experts));
        }
        if self.decoder_sparse_step == 0 {
            return bad("decoder_sparse_step must be at least 1".into());
        }
        if self.head_dim() % 2 != 0 {
            return bad(format!("head_dim ({}) must be even for RoPE", self.head_dim()));
        }
        Ok(())
    }
}

pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: RmsNorm,
    pub k_norm: RmsNorm,
    pub rope: Rope,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// `qk_norm_rope` patch: q/k RMSNorm, RoPE and the heads-first layout in one pass per head row.
    pub fused_qk_rope: bool,
}

impl Attention {
    /// `x` is `[l, hidden]`.
    pub fn forward(&self, x: &[f32], l: usize, cache: &mut KvCache, dtype: DType) -> Vec<f32> {
        let d = self.head_dim;
        let offset = cache.len;
        let (q, k) = (self.q_proj.forward(x, dtype), self.k_proj.forward(x, dtype));
        let v = nn::to_heads_first(&self.v_proj.forward(x, dtype), l, self.n_kv_heads, d);
        let (q, k) = if self.fused_qk_rope {
            let (c, s) = self.rope.tables(l, offset, dtype);
            (self.norm_rope_heads_first(&q, &self.q_norm, self.n_heads, l, &c, &s, dtype), self.norm_rope_heads_first(&k, &self.k_norm, self.n_kv_heads, l, &c, &s, dtype))
        } else {
            let q = self.q_norm.forward(&q, dtype);
            let k = self.k_norm.forward(&k, dtype);
            let mut q = nn::to_heads_first(&q, l, self.n_heads, d);
            let mut k = nn::to_heads_first(&k, l, self.n_kv_heads, d);
            self.rope.apply(&mut q, d, l, offset, dtype);
            self.rope.apply(&mut k, d, l, offset, dtype);
            (q, k)
        };
        let (keys, values) = cache.update_and_fetch(&k, &v, l);
        // mlx-lm passes mask=None for one token and "causal" for several.
        let out = ops::sdpa(&q, &keys, &values, self.n_heads, self.n_kv_heads, l, d, self.scale, l > 1, dtype);
        self.o_proj.forward(&nn::to_tokens_first(&out, l, self.n_heads, d), dtype)
    }

    /// `x` `[l, heads, d]` → RMSNorm each head row, rotate it at its position (tables `c`,
    /// `s` for positions offset..offset+l), stored `[heads, l, d]`: the unfused chain's
    /// exact ops (per-row norm, per-pair rotation), one pass and no intermediate arrays.
    #[allow(clippy::too_many_arguments)]
    fn norm_rope_heads_first(&self, x: &[f32], norm: &RmsNorm, heads: usize, l: usize, c: &[f32], s: &[f32], dtype: DType) -> Vec<f32> {
        let d = self.head_dim;
        let half = self.rope.dims / 2;
        let mut out = vec![0.0; x.len()];
        for t in 0..l {
            for h in 0..heads {
                let mut row = norm.forward(&x[(t * heads + h) * d..(t * heads + h + 1) * d], dtype);
                ops::rope_apply(&mut row, d, self.rope.dims, 1, &c[t * half..(t + 1) * half], &s[t * half..(t + 1) * half], dtype);
                out[(h * l + t) * d..(h * l + t + 1) * d].copy_from_slice(&row);
            }
        }
        out
    }
}

/// One token's routing in one layer: expert ids (mlx-lm's order) and their scores.
pub type Routing = (Vec<u32>, Vec<f32>);

pub struct SparseMoeBlock {
    pub gate: Linear,
    pub switch_mlp: SwitchGlu,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    /// The fused variants `patch` chose (all off: mlx-lm's op sequence).
    pub variant: MoeVariant,
}

impl SparseMoeBlock {
    /// Router for one token: (expert ids in mlx-lm's order, their scores).
    pub fn route(&self, x: &[f32], dtype: DType) -> (Vec<u32>, Vec<f32>) {
        let mut gates = self.gate.forward(x, dtype);
        ops::softmax_precise(&mut gates, dtype);
        let e = gates.len();
        let order = ops::argpartition(&gates, e - self.top_k);
        let inds = order[e - self.top_k..].to_vec();
        let mut scores: Vec<f32> = inds.iter().map(|&i| gates[i as usize]).collect();
        if self.norm_topk_prob {
            let sum = ops::sum_in_dtype(scores.iter().copied(), dtype);
            scores.iter_mut().for_each(|s| *s = dtype.round(*s / sum));
        }
        (inds, scores)
    }

    /// `routing` receives the last row's expert ids and scores (`--routing-stats`).
    pub fn forward(&self, x: &[f32], dtype: DType, routing: &mut Routing) -> Vec<f32> {
        let dims = self.switch_mlp.experts[0].down_proj.out_dims();
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks_exact(dims) {
            let (inds, scores) = self.route(row, dtype);
            *routing = (inds.clone(), scores.clone());
            let experts: Vec<&Mlp> = inds.iter().map(|&e| &self.switch_mlp.experts[e as usize]).collect();
            if self.variant.fused_combine {
                // gather_qmm_combine: each output row's k down-projections and their weighted sum together.
                let acts: Vec<Vec<f32>> = experts.iter().map(|m| self.expert_act(m, row, dtype)).collect();
                let mut buf = vec![0.0; acts[0].len()];
                out.extend((0..dims).map(|c| {
                    let terms = experts.iter().zip(&acts).zip(&scores).map(|((m, a), &s)| dtype.round(m.down_proj.dot_row(c, a, &mut buf, dtype) * s));
                    ops::sum_in_dtype(terms.collect::<Vec<_>>(), dtype)
                }));
            } else {
                let ys: Vec<Vec<f32>> = experts.iter().map(|m| m.down_proj.forward(&self.expert_act(m, row, dtype), dtype)).collect();
                // (y * scores[..., None]).sum(axis=-2): products rounded, then the dtype sum.
                out.extend((0..dims).map(|c| ops::sum_in_dtype(ys.iter().zip(&scores).map(|(y, &s)| dtype.round(y[c] * s)), dtype)));
            }
        }
        out
    }

    /// `swiglu(gate(x), up(x))` of one expert (`gather_qmm_swiglu` when patched).
    fn expert_act(&self, m: &Mlp, x: &[f32], dtype: DType) -> Vec<f32> {
        if self.variant.fused_swiglu {
            m.gate_up_swiglu(x, dtype)
        } else {
            nn::swiglu(&m.gate_proj.forward(x, dtype), &m.up_proj.forward(x, dtype), dtype)
        }
    }
}

pub enum FeedForward {
    Sparse(SparseMoeBlock),
    Dense(Mlp),
}

pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: FeedForward,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
    /// `add_rms_norm` patch: the residual add and post-attention norm in one pass.
    pub fused_add_norm: bool,
}

impl DecoderLayer {
    pub fn forward(&self, x: &[f32], l: usize, cache: &mut KvCache, dtype: DType, routing: &mut Routing) -> Vec<f32> {
        let r = self.self_attn.forward(&self.input_layernorm.forward(x, dtype), l, cache, dtype);
        let (h, normed) = if self.fused_add_norm {
            self.post_attention_layernorm.add_forward(x, &r, dtype)
        } else {
            let h = nn::add(x, &r, dtype);
            let normed = self.post_attention_layernorm.forward(&h, dtype);
            (h, normed)
        };
        let r = match &self.mlp {
            FeedForward::Sparse(moe) => moe.forward(&normed, dtype, routing),
            FeedForward::Dense(mlp) => mlp.forward(&normed, dtype),
        };
        nn::add(&h, &r, dtype)
    }
}

pub struct Model {
    pub args: ModelArgs,
    pub dtype: DType,
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    pub lm_head: Option<Linear>,
}

impl Model {
    pub fn load(config: &ModelConfig, ckpt: &Checkpoint) -> Result<Self> {
        let args: ModelArgs = config.args()?;
        args.validate(config)?;
        let dtype = Loader::infer_dtype(ckpt, "model.embed_tokens")?;
        let ld = Loader { ckpt, quant: &config.quantization, dtype };
        let (dims, hd) = (args.hidden_size, args.head_dim());
        let eps = args.rms_norm_eps;
        let mut layers = Vec::with_capacity(args.num_hidden_layers);
        for i in 0..args.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let self_attn = Attention {
                q_proj: ld.linear(&format!("{a}.q_proj"), args.num_attention_heads * hd, dims)?,
                k_proj: ld.linear(&format!("{a}.k_proj"), args.num_key_value_heads * hd, dims)?,
                v_proj: ld.linear(&format!("{a}.v_proj"), args.num_key_value_heads * hd, dims)?,
                o_proj: ld.linear(&format!("{a}.o_proj"), dims, args.num_attention_heads * hd)?,
                q_norm: ld.rms_norm(&format!("{a}.q_norm"), hd, eps)?,
                k_norm: ld.rms_norm(&format!("{a}.k_norm"), hd, eps)?,
                rope: Rope { dims: hd, base: args.rope_theta, scale: 1.0, traditional: false },
                n_heads: args.num_attention_heads,
                n_kv_heads: args.num_key_value_heads,
                head_dim: hd,
                scale: (hd as f32).powf(-0.5),
                fused_qk_rope: false,
            };
            let mlp = if args.is_sparse_layer(i) {
                FeedForward::Sparse(SparseMoeBlock {
                    gate: ld.linear(&format!("{p}.mlp.gate"), args.num_experts, dims)?,
                    switch_mlp: ld.switch_glu(&format!("{p}.mlp.switch_mlp"), args.num_experts, args.moe_intermediate_size, dims)?,
                    top_k: args.num_experts_per_tok,
                    norm_topk_prob: args.norm_topk_prob,
                    variant: MoeVariant::default(),
                })
            } else {
                FeedForward::Dense(ld.mlp(&format!("{p}.mlp"), args.intermediate_size, dims)?)
            };
            layers.push(DecoderLayer {
                self_attn,
                mlp,
                input_layernorm: ld.rms_norm(&format!("{p}.input_layernorm"), dims, eps)?,
                post_attention_layernorm: ld.rms_norm(&format!("{p}.post_attention_layernorm"), dims, eps)?,
                fused_add_norm: false,
            });
        }
        let lm_head = if args.tie_word_embeddings { None } else { Some(ld.linear("lm_head", args.vocab_size, dims)?) };
        Ok(Model {
            embed_tokens: ld.embedding("model.embed_tokens", args.vocab_size, dims)?,
            norm: ld.rms_norm("model.norm", dims, eps)?,
            layers,
            lm_head,
            dtype,
            args,
        })
    }

    /// Switch blocks to the fused variants of `patterns` (elementary patterns, see
    /// `patch::plan`). Every CPU variant computes the same op sequence in fewer passes.
    pub fn patch(&mut self, patterns: &[Pattern]) -> PatchReport {
        let mut report = PatchReport::default();
        let on = |p: Pattern| patterns.contains(&p);
        for layer in &mut self.layers {
            match &mut layer.mlp {
                FeedForward::Sparse(moe) => {
                    let one = on(Pattern::MoeExperts); // on the CPU: the same values as the two fused passes
                    moe.variant = MoeVariant { fused_gating: false, fused_swiglu: one || on(Pattern::GatherQmmSwiglu), fused_combine: one || on(Pattern::GatherQmmCombine), one_launch: false, routed: false };
                    moe.variant.report(&mut report);
                }
                FeedForward::Dense(mlp) => {
                    mlp.fused = on(Pattern::SwigluMlp);
                    if mlp.fused {
                        report.add("swiglu_mlp");
                    }
                }
            }
            layer.fused_add_norm = on(Pattern::AddRmsNorm);
            if layer.fused_add_norm {
                report.add("add_rms_norm");
            }
            layer.self_attn.fused_qk_rope = on(Pattern::QkNormRope);
            if layer.self_attn.fused_qk_rope {
                report.add("qk_norm_rope");
            }
        }
        report
    }

    pub fn new_cache(&self) -> Vec<KvCache> {
        (0..self.layers.len()).map(|_| KvCache::new(self.args.num_key_value_heads)).collect()
    }

    /// Logits `[vocab]` for the last of `tokens`, after running all of them through the cache.
    /// `routing[i]` receives layer i's expert ids and scores for the last token (empty for
    /// dense layers).
    pub fn forward(&self, tokens: &[u32], cache: &mut [KvCache], routing: &mut Vec<Routing>) -> Vec<f32> {
        let l = tokens.len();
        let mut h = self.embed_tokens.lookup(tokens);
        routing.clear();
        routing.resize(self.layers.len(), Default::default());
        for ((layer, c), r) in self.layers.iter().zip(cache.iter_mut()).zip(routing.iter_mut()) {
            h = layer.forward(&h, l, c, self.dtype, r);
        }
        let dims = self.args.hidden_size;
        // Per-row ops: the last row alone gives the same values as mlx-lm's full-sequence head.
        let last = self.norm.forward(&h[(l - 1) * dims..], self.dtype);
        match &self.lm_head {
            Some(head) => head.forward(&last, self.dtype),
            None => self.embed_tokens.as_linear(&last, self.dtype),
        }
    }
}
