//! Sampled generation (`--temp`, `--top-p`, `--min-p`, `--top-k`, `--seed`): each token is
//! `zmlx_core::sampling::sample` of the logprobs at that step, with the random word of the
//! last input token's position, so a seed replays the same text (and a GPU that samples on the
//! device draws the same words).

mod common;

use common::*;
use zmlx_core::sampling::{sample, step_random};
use zmlx_models::{generate, logprobs, Decoder, LoadedModel, SamplingOptions};

#[test]
fn sampled_tokens_are_the_sampler_applied_step_by_step() {
    let dir = fixtures().into_iter().find(|d| d.ends_with("tiny-qwen3-moe-4bit")).unwrap();
    let model = LoadedModel::load(dir.to_str().unwrap()).unwrap();
    let vocab = model.config.raw["vocab_size"].as_u64().unwrap() as u32;
    let mut session = model.cpu_session();
    let mut rng = Lcg(11);
    let prompt: Vec<u32> = (0..5).map(|_| rng.next(vocab)).collect();
    let opts = SamplingOptions { temp: 0.9, top_p: 0.95, top_k: 50, min_p: 0.02, seed: 1234 };
    session.reset();
    let (tokens, _) = generate(&mut session, &prompt, 12, opts.clone(), &[], |_| {}).unwrap();
    assert_eq!(tokens.len(), 12);
    // Replay: the logprobs after each prefix, sampled with the word of its last position.
    session.reset();
    let mut fed: Vec<u32> = prompt.clone();
    let mut input = prompt.clone();
    for (i, &t) in tokens.iter().enumerate() {
        let lp = logprobs(&session.forward(&input).unwrap(), session.dtype());
        let want = sample(&lp, session.dtype(), &opts.params(), step_random(opts.seed, (fed.len() - 1) as u64));
        assert_eq!(t, want, "token {i}");
        fed.push(t);
        input = vec![t];
    }
    // The same seed replays; sampling is not greedy decoding.
    session.reset();
    assert_eq!(generate(&mut session, &prompt, 12, opts.clone(), &[], |_| {}).unwrap().0, tokens);
    session.reset();
    let greedy = generate(&mut session, &prompt, 12, SamplingOptions::default(), &[], |_| {}).unwrap().0;
    assert_ne!(greedy, tokens, "a random-weight model sampled at temp 0.9 should leave the greedy path");
}
