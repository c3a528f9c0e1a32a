#!/usr/bin/env python3
"""Greedy-decoding oracle: exactly what `mlx_lm.generate` (the CLI, temp 0) produces.

    oracle_generate.py --model DIR (--prompt-tokens 1,2,3 | --prompt TEXT) --max-tokens N
                       [--no-chat-template] [--prefill-step-size 2048] [--time]
      -> {"tokens": [...], "prompt_tokens": [...], "finish_reason": "stop"|"length"}
    oracle_generate.py --model DIR --batch FILE [--time]
      FILE: JSON list of {"prompt_tokens": [...], "max_tokens": N}
            (or {"prompt": TEXT, "max_tokens": N, "chat_template": true|false})
      -> one JSON line: a list of results as above, in order.
    --time adds "prompt_tps", "generation_tps", "generation_tokens", "peak_memory_gb" to each
    result: the numbers mlx_lm.generate --verbose prints (its GenerationResponse fields).

What is mirrored from mlx_lm/generate.py main() (mlx-lm 0.32.2):
  * load(model, tokenizer_config={"trust_remote_code": False},
         model_config={"quantize_activations": False}, return_config=True)
  * --prompt: the CLI first replaces the two-character sequences "\\n" and "\\t" by newline and
    tab; then, if the tokenizer has a chat template and --no-chat-template is not given,
    messages = [{"role": "user", "content": prompt}],
    prompt = tokenizer.apply_chat_template(messages, tokenize=False,
                                           continue_final_message=False,
                                           add_generation_prompt=True)
    and ids = tokenizer.encode(prompt, add_special_tokens=not use_chat_template), i.e. no
    special tokens (no BOS) are added to a chat-templated prompt; with --no-chat-template the
    tokenizer's own special tokens are added (none for the Qwen tokenizers: no BOS).
  * --prompt-tokens: the ids are given to stream_generate as a list, as they are.
  * sampler = make_sampler(temp=0.0, ...) -> greedy argmax over logits - logsumexp(logits);
    stream_generate -> generate_step with prefill_step_size 2048 (prompt[:-1] prefilled in
    chunks, the last prompt token goes through the first decoding step), max_kv_size None,
    no kv quantization.

EOS rule (mlx_lm.generate.stream_generate): the eos set is tokenizer.eos_token_ids = the
config's eos_token_id (overridden by generation_config.json's eos_token_id, int or list, when
that file has one) plus the tokenizer's eos_token. When a sampled token is in that set, generation
stops and that token is NOT added to the text, but the last GenerationResponse still carries it as
`.token` (finish_reason "stop") and counts it in generation_tokens. The "tokens" printed here are the
`.token` of every response stream_generate yields, so they END WITH the EOS id when
finish_reason == "stop"; otherwise there are exactly max_tokens of them ("length").
The EOS check happens before the max_tokens check, so an EOS as the N-th token gives "stop".

CPU note: MLX's CPU backend has no float16/bfloat16 GatherMM (unquantized expert matmul), so on
the CPU device this script computes gather_mm for half types as the CPU backend computes a plain
half matmul (inputs upcast to float32, float32 product, result rounded to the input dtype; for
mx.matmul this is bit-identical on CPU). Quantized experts (gather_qmm) and float32 are untouched.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import mlx.core as mx

_HALF = (mx.float16, mx.bfloat16)


def install_cpu_half_gather_mm():
    """Make mx.gather_mm work for float16/bfloat16 on the CPU device (see module docstring).
    Only install this when the default device is the CPU."""
    if getattr(mx.gather_mm, "_zmlx_shim", False):
        return
    orig = mx.gather_mm

    def gather_mm(a, b, lhs_indices=None, rhs_indices=None, *, sorted_indices=False, stream=None):
        if a.dtype in _HALF and b.dtype == a.dtype:
            out = orig(
                a.astype(mx.float32),
                b.astype(mx.float32),
                lhs_indices,
                rhs_indices,
                sorted_indices=sorted_indices,
                stream=stream,
            )
            return out.astype(a.dtype)
        return orig(a, b, lhs_indices, rhs_indices, sorted_indices=sorted_indices, stream=stream)

    gather_mm._zmlx_shim = True
    mx.gather_mm = gather_mm


def _is_cpu():
    return mx.default_device().type == mx.cpu


class Oracle:
    def __init__(self, model_path, prefill_step_size=2048):
        from mlx_lm.utils import load

        if _is_cpu():
            install_cpu_half_gather_mm()
        self.model, self.tokenizer, self.config = load(
            model_path,
            tokenizer_config={"trust_remote_code": False},
            model_config={"quantize_activations": False},
            return_config=True,
            trust_remote_code=False,
        )
        self.prefill_step_size = prefill_step_size

    def encode_prompt(self, prompt, use_template=True):
        """mlx_lm.generate main(): chat template + encode."""
        tokenizer = self.tokenizer
        prompt = prompt.replace("\\n", "\n").replace("\\t", "\t")
        use_chat_template = use_template and tokenizer.has_chat_template
        if use_chat_template:
            messages = [{"role": "user", "content": prompt}]
            prompt = tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                continue_final_message=False,
                add_generation_prompt=True,
            )
        return tokenizer.encode(prompt, add_special_tokens=not use_chat_template)

    def generate(self, prompt_tokens, max_tokens, timing=False):
        from mlx_lm.generate import stream_generate
        from mlx_lm.sample_utils import make_sampler

        tokenizer = self.tokenizer
        # As the CLI with its defaults: temp 0 -> greedy_sampler.
        sampler = make_sampler(
            0.0,
            1.0,
            0.0,
            1,
            top_k=0,
            xtc_probability=0.0,
            xtc_threshold=0.1,
            xtc_special_tokens=tokenizer.encode("\n") + list(tokenizer.eos_token_ids),
        )
        tokens = []
        last = None
        for response in stream_generate(
            self.model,
            tokenizer,
            list(prompt_tokens),
            max_tokens=max_tokens,
            sampler=sampler,
            max_kv_size=None,
            prefill_step_size=self.prefill_step_size,
            prompt_cache=None,
            kv_bits=None,
            kv_group_size=64,
            quantized_kv_start=5000,
        ):
            tokens.append(int(response.token))
            last = response
        out = {
            "tokens": tokens,
            "prompt_tokens": [int(t) for t in prompt_tokens],
            "finish_reason": last.finish_reason,
        }
        if timing:
            out.update(
                prompt_tps=last.prompt_tps,
                generation_tps=last.generation_tps,
                generation_tokens=last.generation_tokens,
                peak_memory_gb=last.peak_memory,
            )
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt-tokens", help="comma-separated token ids, fed as they are")
    g.add_argument("--prompt", help="text; chat template applied as mlx_lm.generate does")
    g.add_argument("--batch", help="JSON file: list of {prompt_tokens|prompt, max_tokens}")
    ap.add_argument("--max-tokens", type=int, default=100)
    ap.add_argument("--no-chat-template", action="store_true")
    ap.add_argument("--prefill-step-size", type=int, default=2048)
    ap.add_argument("--time", action="store_true")
    args = ap.parse_args()

    oracle = Oracle(args.model, prefill_step_size=args.prefill_step_size)

    def run_one(item):
        if "prompt_tokens" in item:
            ids = [int(t) for t in item["prompt_tokens"]]
        else:
            ids = oracle.encode_prompt(item["prompt"], item.get("chat_template", True))
        return oracle.generate(ids, int(item.get("max_tokens", args.max_tokens)), args.time)

    if args.batch:
        with open(args.batch) as f:
            items = json.load(f)
        result = [run_one(it) for it in items]
    elif args.prompt_tokens is not None:
        ids = [int(t) for t in args.prompt_tokens.replace(" ", "").split(",") if t != ""]
        result = run_one({"prompt_tokens": ids})
    else:
        result = run_one({"prompt": args.prompt, "chat_template": not args.no_chat_template})
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
