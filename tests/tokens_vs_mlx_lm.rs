//! The contract's second clause: on the CPU, every fixture written by mlx-lm decodes to
//! the same greedy tokens as mlx-lm itself (run live), for several prompts, 32 tokens each.

mod common;

use common::*;
use serde_json::json;
use zmlx_models::{generate, LoadedModel, SamplingOptions};

const MAX_TOKENS: usize = 32;

#[test]
fn greedy_tokens_match_mlx_lm_on_every_fixture() {
    let mut total = 0;
    for dir in fixtures() {
        let model = LoadedModel::load(dir.to_str().unwrap()).unwrap();
        let vocab = model.config.raw["vocab_size"].as_u64().unwrap() as u32;
        let mut rng = Lcg(dir.to_string_lossy().len() as u64);
        // Short, medium and long prompts (the long one crosses mlx-lm's sorted-experts path, indices >= 64).
        let prompts: Vec<Vec<u32>> = [1usize, 5, 19, 48].iter().map(|&n| (0..n).map(|_| rng.next(vocab)).collect()).collect();
        let requests: Vec<_> = prompts.iter().map(|p| json!({"prompt_tokens": p, "max_tokens": MAX_TOKENS})).collect();
        let expected = oracle_batch(&dir, &json!(requests));
        let eos = model.eos_token_ids();
        let mut distinct = std::collections::BTreeSet::new();
        for (prompt, want) in prompts.iter().zip(&expected) {
            let mut session = model.cpu_session();
            let (got, stats) = generate(&mut session, prompt, MAX_TOKENS, SamplingOptions::default(), &eos, |_| {}).unwrap();
            let (want, stopped) = oracle_tokens(want);
            assert_eq!(got, want, "{}: prompt {:?}", dir.display(), prompt);
            assert_eq!(stats.finish_reason == "stop", stopped, "{}: finish reason", dir.display());
            distinct.extend(got);
            total += 1;
        }
        // Random-weight models collapse onto one token unless scaled; make sure paths are varied.
        assert!(distinct.len() >= 12, "{}: only {} distinct tokens over all prompts", dir.display(), distinct.len());
    }
    eprintln!("{total} prompts identical to mlx-lm");
}

#[test]
fn text_prompt_with_chat_template_matches_mlx_lm() {
    let dir = root().join("fixtures/tiny-qwen3-moe-4bit");
    let prompts = ["Write a haiku about GPUs.", "你好，世界", "def f(x):\\n    return x * 2"];
    let requests: Vec<_> = prompts.iter().map(|p| json!({"prompt": p, "max_tokens": 24, "chat_template": true})).collect();
    let expected = oracle_batch(&dir, &json!(requests));
    for (prompt, want) in prompts.iter().zip(&expected) {
        let (code, stdout, stderr) = zmlx(&["generate", "--model", dir.to_str().unwrap(), "--prompt", prompt, "--max-tokens", "24", "--json"]);
        assert_eq!(code, 0, "{stderr}");
        let got: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        let want_prompt: Vec<u64> = want["prompt_tokens"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(got["prompt_tokens"].as_u64().unwrap() as usize, want_prompt.len(), "prompt length for {prompt:?}");
        let got_prompt: Vec<u64> = got["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(got_prompt, want_prompt, "chat-templated prompt ids for {prompt:?}");
        let got_tokens: Vec<u32> = got["tokens"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(got_tokens, oracle_tokens(want).0, "prompt {prompt:?}");
        assert!(got["text"].is_string() && got["generation_tps"].is_number() && got["peak_memory_bytes"].as_u64().unwrap() > 0);
    }
}
