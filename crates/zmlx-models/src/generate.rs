//! Prefill, then decode one token at a time with the KV cache; greedy or
//! sampled; stats like mlx_lm.generate's.

use std::time::Instant;

use rand::{rngs::StdRng, Rng, SeedableRng};
use zmlx_core::{ops, DType};

use crate::error::{ModelError, Result};
use crate::patch::{Backend, PatchReport, Pattern};

/// Turns tokens into next-token logits, keeping its own KV cache (a CPU model, a CUDA engine…).
pub trait Decoder {
    /// Run `tokens` through the model after what is cached; logits `[vocab]` of the last one.
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>>;
    /// Forget the cache.
    /// The greedy next token after `tokens`: `argmax(logprobs)` as mlx-lm computes it.
    /// A GPU backend overrides this to keep the logits on the device.
    fn forward_greedy(&mut self, tokens: &[u32]) -> Result<u32> {
        let logits = self.forward(tokens)?;
        Ok(ops::argmax(&logprobs(&logits, self.dtype())) as u32)
    }
    fn reset(&mut self);
    /// Let `forward_greedy` enqueue the next step before it is asked for (a GPU backend whose
    /// device already holds the greedy token), so the host's turn-around between steps does
    /// not leave the device idle. A call with other tokens discards that step. `generate` turns
    /// it on for greedy decoding and off when it returns.
    fn set_lookahead(&mut self, _on: bool) {}
    /// Switch blocks to the fused variants of these elementary patterns (an empty list
    /// restores the reference path); the cache is reset.
    fn patch(&mut self, patterns: &[Pattern]) -> Result<PatchReport>;
    fn backend(&self) -> Backend;
    /// Each layer's routing in the last step (expert ids, weights; empty for dense layers),
    /// where the backend records it.
    fn last_routing(&self) -> Result<Option<Vec<(Vec<u32>, Vec<f32>)>>> {
        Ok(None)
    }
    /// Kernel launches per decode step, where the backend launches kernels.
    fn launches_per_token(&self) -> Option<usize> {
        None
    }
    fn vocab_size(&self) -> usize;
    fn dtype(&self) -> DType;
    /// Bytes of memory at the peak (device memory on a GPU, resident set on the CPU).
    fn peak_memory_bytes(&self) -> u64 {
        peak_rss_bytes()
    }
}

#[derive(Clone, Debug)]
pub struct SamplingOptions {
    /// 0 means greedy.
    pub temp: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions { temp: 0.0, top_p: 1.0, top_k: 0, seed: 0 }
    }
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub prompt_tps: f64,
    pub generation_tokens: usize,
    pub generation_tps: f64,
    pub peak_memory_bytes: u64,
    /// "stop" (an EOS id came) or "length" (max_tokens reached), as mlx-lm reports.
    pub finish_reason: &'static str,
}

/// mlx-lm's `logits - logsumexp(logits)`, rounded in the model dtype.
pub fn logprobs(logits: &[f32], dtype: DType) -> Vec<f32> {
    let lse = ops::logsumexp(logits, dtype);
    logits.iter().map(|&l| dtype.round(l - lse)).collect()
}

pub struct Sampler {
    opts: SamplingOptions,
    rng: StdRng,
}

impl Sampler {
    pub fn new(opts: SamplingOptions) -> Self {
        let rng = StdRng::seed_from_u64(opts.seed);
        Sampler { opts, rng }
    }

    /// Greedy: `argmax(logprobs)` exactly as mlx-lm. Otherwise top-k, then
    /// top-p, then a categorical draw from `logprobs / temp`.
    pub fn sample(&mut self, logprobs: &[f32]) -> u32 {
        if self.opts.temp <= 0.0 {
            return ops::argmax(logprobs) as u32;
        }
        let mut cand: Vec<(usize, f64)> = logprobs.iter().enumerate().map(|(i, &l)| (i, l as f64 / self.opts.temp as f64)).collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1));
        if self.opts.top_k > 0 {
            cand.truncate(self.opts.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.opts.top_p < 1.0 {
            let mut cum = 0.0;
            let keep = probs.iter().position(|&p| {
                cum += p;
                cum >= self.opts.top_p as f64
            });
            let keep = keep.map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let mut u: f64 = self.rng.random();
        for (c, p) in cand.iter().zip(&probs) {
            u -= p;
            if u <= 0.0 {
                return c.0 as u32;
            }
        }
        cand[probs.len() - 1].0 as u32
    }
}

/// Generate up to `max_tokens` after `prompt`, calling `on_token` for each new
/// token. Stops at an EOS id, which (like mlx-lm) is not part of the output.
pub fn generate(
    decoder: &mut dyn Decoder,
    prompt: &[u32],
    max_tokens: usize,
    sampling: SamplingOptions,
    eos: &[u32],
    on_token: impl FnMut(u32),
) -> Result<(Vec<u32>, GenerationStats)> {
    decoder.set_lookahead(sampling.temp <= 0.0);
    let out = generate_steps(decoder, prompt, max_tokens, sampling, eos, on_token);
    decoder.set_lookahead(false);
    out
}

fn generate_steps(
    decoder: &mut dyn Decoder,
    prompt: &[u32],
    max_tokens: usize,
    sampling: SamplingOptions,
    eos: &[u32],
    mut on_token: impl FnMut(u32),
) -> Result<(Vec<u32>, GenerationStats)> {
    if prompt.is_empty() {
        return Err(ModelError::invalid("the prompt is empty: give --prompt or --prompt-tokens"));
    }
    let vocab = decoder.vocab_size();
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(ModelError::invalid(format!("prompt token id {bad} is out of range (vocab size {vocab})")));
    }
    let dtype = decoder.dtype();
    let mut sampler = Sampler::new(sampling.clone());
    let mut tokens = Vec::new();
    let mut stats = GenerationStats { prompt_tokens: prompt.len(), ..Default::default() };
    if max_tokens == 0 {
        stats.finish_reason = "length";
        return Ok((tokens, stats));
    }
    let greedy = sampling.temp <= 0.0;
    let step = |decoder: &mut dyn Decoder, sampler: &mut Sampler, input: &[u32]| -> Result<u32> {
        if greedy {
            decoder.forward_greedy(input)
        } else {
            Ok(sampler.sample(&logprobs(&decoder.forward(input)?, dtype)))
        }
    };
    let start = Instant::now();
    let mut next = step(decoder, &mut sampler, prompt)?;
    let prompt_secs = start.elapsed().as_secs_f64();
    stats.prompt_tps = prompt.len() as f64 / prompt_secs;
    let decode_start = Instant::now();
    loop {
        if eos.contains(&next) {
            stats.finish_reason = "stop";
            break;
        }
        tokens.push(next);
        on_token(next);
        if tokens.len() >= max_tokens {
            stats.finish_reason = "length";
            break;
        }
        next = step(decoder, &mut sampler, &[next])?;
    }
    let decode_secs = decode_start.elapsed().as_secs_f64();
    stats.generation_tokens = tokens.len();
    // Tokens produced by decode steps (the first came from the prefill), per second of decoding.
    stats.generation_tps = if tokens.len() > 1 && decode_secs > 0.0 { (tokens.len() - 1) as f64 / decode_secs } else { 0.0 };
    stats.peak_memory_bytes = decoder.peak_memory_bytes();
    Ok((tokens, stats))
}

/// Peak resident set size of this process (Linux `VmHWM`), 0 where unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
