//! Prefill, then decode one token at a time with the KV cache; greedy or
//! sampled; stats like mlx_lm.generate's.

use std::time::Instant;

use zmlx_core::sampling::{self, SampleParams};
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
    /// The next token after `tokens` drawn with `params` (temp > 0) and the random word
    /// `sampling::step_random(seed, pos)`, `pos` being the position of the last of `tokens`:
    /// `zmlx_core::sampling::sample` on `logprobs`. A GPU backend overrides this to sample
    /// on the device (same integers, same token).
    fn forward_sample(&mut self, tokens: &[u32], params: &SampleParams, seed: u64, pos: usize) -> Result<u32> {
        sample_on_host(self, tokens, params, seed, pos)
    }
    fn reset(&mut self);
    /// Let `forward_greedy` / `forward_sample` enqueue the next step before it is asked for (a
    /// GPU backend whose device already holds the chosen token), so the host's turn-around
    /// between steps does not leave the device idle. A call with other tokens discards that
    /// step. `generate` turns it on and off when it returns.
    fn set_lookahead(&mut self, _on: bool) {}
    /// How many prompt steps may run at once (a GPU backend runs the prompt's steps
    /// concurrently; each computes what it computes alone). 1: one at a time.
    fn set_prefill_lanes(&mut self, _lanes: usize) {}
    fn prefill_lanes(&self) -> usize {
        1
    }
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

/// `zmlx generate`'s sampling flags: temp 0 is greedy; otherwise mlx-lm's top-p, then top-k,
/// then a draw at the temperature (`zmlx_core::sampling`), reproducible from the seed.
#[derive(Clone, Debug)]
pub struct SamplingOptions {
    /// 0 means greedy.
    pub temp: f32,
    pub top_p: f32,
    pub top_k: usize,
    /// 0: off.
    pub min_p: f32,
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions { temp: 0.0, top_p: 1.0, top_k: 0, min_p: 0.0, seed: 0 }
    }
}

impl SamplingOptions {
    pub fn params(&self) -> SampleParams {
        SampleParams { temp: self.temp, top_p: self.top_p, top_k: self.top_k, min_p: self.min_p }
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

/// [`Decoder::forward_sample`] from the logits read back: `forward`, then
/// `zmlx_core::sampling::sample` on the host.
pub fn sample_on_host<D: Decoder + ?Sized>(d: &mut D, tokens: &[u32], params: &SampleParams, seed: u64, pos: usize) -> Result<u32> {
    let lp = logprobs(&d.forward(tokens)?, d.dtype());
    Ok(sampling::sample(&lp, d.dtype(), params, sampling::step_random(seed, pos as u64)))
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
    decoder.set_lookahead(true);
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
    let mut tokens = Vec::new();
    let mut stats = GenerationStats { prompt_tokens: prompt.len(), ..Default::default() };
    if max_tokens == 0 {
        stats.finish_reason = "length";
        return Ok((tokens, stats));
    }
    let (greedy, params) = (sampling.temp <= 0.0, sampling.params());
    // `pos`: the position of the last input token, which names the step's random word.
    let step = |decoder: &mut dyn Decoder, input: &[u32], pos: usize| -> Result<u32> {
        if greedy {
            decoder.forward_greedy(input)
        } else {
            decoder.forward_sample(input, &params, sampling.seed, pos)
        }
    };
    let start = Instant::now();
    let mut next = step(decoder, prompt, prompt.len() - 1)?;
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
        next = step(decoder, &[next], prompt.len() + tokens.len() - 1)?;
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
