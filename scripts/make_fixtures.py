#!/usr/bin/env python3
"""Write tiny random-weight qwen3_moe checkpoints in the mlx-community format.

Usage: .venv/bin/python scripts/make_fixtures.py [--out fixtures] [--only NAME ...] [--no-check]

Every fixture is written by mlx-lm's own code, following mlx_lm.convert step by step:

  convert():  load(hf_path)            -> here: mlx_lm.models.qwen3_moe.Model(ModelArgs(config))
                                          with seeded random weights (scaled, see init_weights)
              cast to dtype             -> the same set_dtype / model.cast_predicate code as convert
              quantize_model(...)       -> mlx_lm.utils.quantize_model, default predicate, i.e. the
                                          model's own quant_predicate (router mlp.gate: 8 bit g64),
                                          writes config["quantization"] + ["quantization_config"]
              save(...)                 -> mlx_lm.utils.save_model + mlx_lm.utils.save_config,
                                          generation_config.json copied as save() copies it.
                                          The tokenizer files are written by this script (see below).

The tokenizer is a small byte-level BPE built here with `tokenizers` (Qwen2 pre-tokenizer regex,
NFC normalizer, ByteLevel decoder), with `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` appended
after the BPE vocab as in Qwen's tokenizer. All fixtures share it. tokenizer_config.json follows
the Qwen3 layout (tokenizer_class Qwen2Tokenizer, eos `<|im_end|>`, pad `<|endoftext|>`, no BOS,
chat_template inline). One fixture (`tiny-qwen3-moe-4bit-sharded`) instead gets the tokenizer files
exactly as mlx_lm.utils.save() writes them today, through transformers' save_pretrained, which puts
the template in chat_template.jinja rather than in tokenizer_config.json (newer mlx-community repos
look like that).

Deterministic (numpy + mx.random seeds per fixture) and idempotent (each folder is rewritten).
After writing, every fixture is loaded back with mlx_lm.load and greedy-decoded (stats printed).
"""

import argparse
import functools
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten

import mlx_lm.utils as mlx_utils
from mlx_lm.models import qwen3_moe
from mlx_lm.generate import generate_step, stream_generate
from mlx_lm.sample_utils import make_sampler

REPO = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oracle_generate import install_cpu_half_gather_mm  # noqa: E402

if mx.default_device().type == mx.cpu:
    # mlx's CPU backend has no f16/bf16 GatherMM (unquantized experts); see oracle_generate.py
    install_cpu_half_gather_mm()

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BPE_VOCAB = 381  # + 3 special tokens = 384
VOCAB_SIZE = BPE_VOCAB + len(SPECIAL_TOKENS)
ENDOFTEXT_ID = BPE_VOCAB
IM_START_ID = BPE_VOCAB + 1
IM_END_ID = BPE_VOCAB + 2

# The Qwen2 / Qwen3 pre-tokenizer regex (from Qwen's tokenizer.json).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML, like Qwen's template without tools/thinking.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. A small model can still learn to write.",
    "Once upon a time, in a village by the sea, there lived an old fisherman and his wife.",
    "Every morning he went out in his boat, and every evening he came back with fish.",
    "Mixture of experts models route each token to a few experts chosen by a router.",
    "The router computes a softmax over the experts and keeps the top k of them.",
    "Quantization stores weights in 4 bits with a scale and a bias for every group.",
    "Hello, world! How are you today? I'm fine, thanks. We'll see you tomorrow.",
    "It's 2024 and the numbers 0 1 2 3 4 5 6 7 8 9 10 42 100 1000 3.14159 are here.",
    "user: What is the capital of France?\nassistant: The capital of France is Paris.",
    "user: Write a poem about the moon.\nassistant: Silver light on quiet water, the moon is slow.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for i in range(10):\n    print(f\"value {i}: {i * i}\")\n",
    "import numpy as np\nx = np.zeros((4, 4), dtype=np.float32)\nprint(x.sum())\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    println!(\"{:?}\", v);\n}\n",
    "pub struct Config {\n    pub hidden_size: usize,\n    pub num_layers: usize,\n}\n",
    "if (x > 0 && y < 10) { return x + y; } else { return -1; }",
    "<html><body><p>Hello</p></body></html>",
    '{"name": "test", "values": [1, 2, 3], "ok": true}',
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "机器学习是人工智能的一个分支。模型通过数据学习规律。",
    "我喜欢读书和写代码。这个模型很小，但是可以生成文字。",
    "春天来了，花开了，鸟儿在树上唱歌。",
    "Les modèles de langue génèrent du texte. Größe, naïve, café, über.",
    "Emoji: 🙂 🚀 ✨ and symbols: © ® → ∑ ∞ ≤ ≥",
]


# ----------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer():
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(
        models.BPE(
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    assert tok.get_vocab_size() == BPE_VOCAB, tok.get_vocab_size()
    tok.add_special_tokens(SPECIAL_TOKENS)
    assert tok.get_vocab_size() == VOCAB_SIZE
    assert tok.token_to_id("<|im_end|>") == IM_END_ID
    return tok


def tokenizer_config():
    added = {
        str(BPE_VOCAB + i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer_src(tok, path: Path):
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    with open(path / "tokenizer_config.json", "w") as f:
        json.dump(tokenizer_config(), f, indent=2, ensure_ascii=False)
        f.write("\n")


# ----------------------------------------------------------------------------------------
# Model configs


def hf_config(
    *,
    dtype="bfloat16",
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=64,
    intermediate_size=128,
    decoder_sparse_step=1,
    mlp_only_layers=(),
    norm_topk_prob=True,
    tie_word_embeddings=False,
    rope_theta=1000000.0,
    rms_norm_eps=1e-06,
):
    """A config.json as Qwen/Qwen3-30B-A3B has it, with tiny shapes."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ENDOFTEXT_ID,
        "decoder_sparse_step": decoder_sparse_step,
        "eos_token_id": IM_END_ID,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": 4096,
        "max_window_layers": num_hidden_layers,
        "mlp_only_layers": list(mlp_only_layers),
        "model_type": "qwen3_moe",
        "moe_intermediate_size": moe_intermediate_size,
        "norm_topk_prob": norm_topk_prob,
        "num_attention_heads": num_attention_heads,
        "num_experts": num_experts,
        "num_experts_per_tok": num_experts_per_tok,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_key_value_heads,
        "output_router_logits": False,
        "rms_norm_eps": rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": rope_theta,
        "router_aux_loss_coef": 0.001,
        "sliding_window": None,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": dtype,
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": VOCAB_SIZE,
    }


GENERATION_CONFIG = {
    "bos_token_id": ENDOFTEXT_ID,
    "do_sample": True,
    "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
    "pad_token_id": ENDOFTEXT_ID,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
    "transformers_version": "4.51.0",
}

# name -> seed, dtype, q: (bits, group) or None, cfg: config overrides, note: for README
FIXTURES = {
    "tiny-qwen3-moe-4bit": dict(seed=1, dtype="bfloat16", q=(4, 64), note="the base fixture"),
    "tiny-qwen3-moe-bf16": dict(seed=2, dtype="bfloat16", q=None),
    "tiny-qwen3-moe-f32": dict(seed=3, dtype="float32", q=None),
    # head_dim 16: q_proj 64->64, o_proj 64->64
    "tiny-qwen3-moe-3bit-g32": dict(seed=4, dtype="bfloat16", q=(3, 32), cfg=dict(head_dim=16), note="head_dim 16"),
    # hidden 128 so attention / router / embedding / lm_head / expert gate+up quantize with g128;
    # switch_mlp.down_proj has in-dim 64 (moe_intermediate) so mlx-lm leaves it bf16.
    "tiny-qwen3-moe-6bit-g128": dict(
        seed=5, dtype="bfloat16", q=(6, 128), cfg=dict(hidden_size=128, moe_intermediate_size=64),
        note="hidden 128; switch_mlp.down_proj (in-dim 64) left unquantized bf16 by mlx-lm",
    ),
    # 16 experts, top-4
    "tiny-qwen3-moe-8bit": dict(
        seed=6, dtype="bfloat16", q=(8, 64), cfg=dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32),
        note="16 experts top-4, moe_intermediate 32",
    ),
    # norm_topk_prob false
    "tiny-qwen3-moe-2bit-g32": dict(
        seed=7, dtype="bfloat16", q=(2, 32), cfg=dict(norm_topk_prob=False, moe_intermediate_size=32),
        note="norm_topk_prob false, moe_intermediate 32",
    ),
    # one kv head (GQA 4:1), 4 layers
    "tiny-qwen3-moe-5bit-g64": dict(
        seed=8, dtype="bfloat16", q=(5, 64), cfg=dict(num_key_value_heads=1, num_hidden_layers=4),
        note="1 kv head, 4 layers",
    ),
    # tied (quantized) embedding; layer 0 dense via mlp_only_layers, layer 2 dense via
    # decoder_sparse_step 2; layers 1, 3 MoE. Dense MLP uses intermediate_size (128).
    "tiny-qwen3-moe-4bit-tied": dict(
        seed=9,
        dtype="bfloat16",
        q=(4, 64),
        cfg=dict(tie_word_embeddings=True, num_hidden_layers=4, mlp_only_layers=[0], decoder_sparse_step=2),
        note="tied quantized embedding (no lm_head); 4 layers: 0 dense (mlp_only_layers), 1 MoE, "
        "2 dense (decoder_sparse_step 2), 3 MoE; dense MLP intermediate_size 128",
    ),
    "tiny-qwen3-moe-4bit-sharded": dict(seed=10, dtype="bfloat16", q=(4, 64), shard_bytes=120_000, hf_tokenizer_save=True,
        note="3 safetensors shards + index; tokenizer files as transformers save_pretrained writes "
        "them (chat template in chat_template.jinja, not in tokenizer_config.json)"),
    "tiny-qwen3-moe-f16-4bit": dict(seed=11, dtype="float16", q=(4, 64), note="float16 scales/biases/norms"),
    "tiny-qwen3-moe-f32-4bit": dict(seed=12, dtype="float32", q=(4, 64), note="float32 scales/biases/norms: CUDA vs CPU agree to f32 precision"),
}


# ----------------------------------------------------------------------------------------
# Weights

# Scales chosen so that greedy decoding from random weights does not collapse onto one token
# (with default-like init it loops on one token, the tied model repeats its input token):
# lm_head gives logits of std ~6; attention (v, o) and expert (gate, up, down) weights are
# drawn with std GAIN/sqrt(fan_in) with GAIN 3, so every layer rewrites the residual rather than
# adding a small correction to the token embedding (a sweep over gains 1..4 gave the most
# distinct greedy tokens around 3); router logits std ~2.5 (well separated gates); norm weights
# drawn in [0.6, 1.4] (so a runtime that ignores them is caught).
EMBED_STD = 1.0
LM_HEAD_GAIN = 6.0
ATTN_GAIN = 3.0
MLP_GAIN = 3.0
ROUTER_GAIN = 2.5


def init_weights(model: nn.Module, args: qwen3_moe.ModelArgs, rng: np.random.Generator):
    def normal(shape, std):
        return mx.array(rng.standard_normal(shape).astype(np.float32) * std)

    def norm_w(n):
        return mx.array(rng.uniform(0.6, 1.4, size=(n,)).astype(np.float32))

    new = {}
    for k, v in tree_flatten(model.parameters()):
        shape = tuple(v.shape)
        fan_in = shape[-1]
        if k.endswith("norm.weight"):
            new[k] = norm_w(shape[0])
        elif k == "model.embed_tokens.weight":
            new[k] = normal(shape, EMBED_STD)
        elif k == "lm_head.weight":
            new[k] = normal(shape, LM_HEAD_GAIN / np.sqrt(fan_in))
        elif ".self_attn." in k:
            new[k] = normal(shape, ATTN_GAIN / np.sqrt(fan_in))
        elif k.endswith("mlp.gate.weight"):
            new[k] = normal(shape, ROUTER_GAIN / np.sqrt(fan_in))
        elif ".mlp." in k:
            new[k] = normal(shape, MLP_GAIN / np.sqrt(fan_in))
        else:
            raise ValueError(f"unexpected parameter {k}")
    if args.tie_word_embeddings:
        # The tied embedding doubles as lm_head: keep logits of the same size as the untied case.
        new["model.embed_tokens.weight"] = normal(
            model.model.embed_tokens.weight.shape, LM_HEAD_GAIN / np.sqrt(args.hidden_size)
        )
    model.update(tree_unflatten(list(new.items())))
    mx.eval(model.parameters())


class _ByteLimit(int):
    """An int for mlx_lm.utils.make_shards' `max_file_size_gb` whose `<< 30` is a no-op, so that
    mlx-lm's own shard splitting runs with a limit in bytes (for a tiny sharded fixture)."""

    def __lshift__(self, _):
        return int(self)


def write_fixture(name: str, spec: dict, out_dir: Path, tok_src: Path):
    seed = spec["seed"]
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)

    config = hf_config(dtype=spec["dtype"], **spec.get("cfg", {}))
    args = qwen3_moe.ModelArgs.from_dict(config)
    model = qwen3_moe.Model(args)
    init_weights(model, args, rng)

    # --- as mlx_lm.convert: cast to dtype
    dtype = getattr(mx, config["torch_dtype"])
    cast_predicate = getattr(model, "cast_predicate", lambda _: True)

    def set_dtype(k, v):
        if cast_predicate(k) and mx.issubdtype(v.dtype, mx.floating):
            return v.astype(dtype)
        return v

    model.update(tree_map_with_path(set_dtype, model.parameters()))

    # --- as mlx_lm.convert: quantize with the model's own quant_predicate
    if spec["q"] is not None:
        bits, group_size = spec["q"]
        model, config = mlx_utils.quantize_model(model, config, group_size, bits, mode="affine")

    # --- as mlx_lm.utils.save
    dst = out_dir / name
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    orig_make_shards = mlx_utils.make_shards
    try:
        if "shard_bytes" in spec:
            mlx_utils.make_shards = functools.partial(
                orig_make_shards, max_file_size_gb=_ByteLimit(spec["shard_bytes"])
            )
        mlx_utils.save_model(dst, model, donate_model=True)
    finally:
        mlx_utils.make_shards = orig_make_shards
    mlx_utils.save_config(config, config_path=dst / "config.json")
    with open(dst / "generation_config.json", "w") as f:
        json.dump(GENERATION_CONFIG, f, indent=2)
        f.write("\n")

    if spec.get("hf_tokenizer_save"):
        # exactly what mlx_lm.utils.save does: tokenizer.save_pretrained(dst)
        tokenizer = mlx_utils.load_tokenizer(tok_src)
        tokenizer.save_pretrained(dst)
    else:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tok_src / f, dst / f)


# ----------------------------------------------------------------------------------------
# Checks

CHECK_PROMPTS = [
    [IM_START_ID, 84, 82, 258, 198],
    [10, 20, 30, 40, 50, 60],
    [300, 7, 7, 7],
    [IM_START_ID],
    list(range(100, 164)),
]


def greedy_ids(model, prompt, n):
    out = []
    for tok, _ in generate_step(mx.array(prompt), model, max_tokens=n, sampler=make_sampler(0.0)):
        out.append(tok)
    return out


def file_sizes(path: Path):
    return {p.name: p.stat().st_size for p in sorted(path.iterdir())}


def check_fixture(name: str, out_dir: Path, n=32):
    path = out_dir / name
    model, tokenizer, config = mlx_utils.load(str(path), return_config=True)
    assert config["vocab_size"] >= len(tokenizer.get_vocab())
    seqs = [greedy_ids(model, p, n) for p in CHECK_PROMPTS]
    distinct = [len(set(s)) for s in seqs]
    n_eos = sum(t in tokenizer.eos_token_ids for s in seqs for t in s)
    n_unique_seqs = len({tuple(s) for s in seqs})

    # Chat prompt through mlx_lm's generate path (as the CLI does it).
    msgs = [{"role": "user", "content": "Hello, how are you? 你好"}]
    chat = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    chat_ids = tokenizer.encode(chat, add_special_tokens=False)
    text = ""
    last = None
    for r in stream_generate(model, tokenizer, chat_ids, max_tokens=24, sampler=make_sampler(0.0)):
        text += r.text
        last = r

    # logit margins: top1 - top2 on a prefill of 64 tokens (float32 view)
    logits = model(mx.array(CHECK_PROMPTS[-1])[None]).astype(mx.float32)[0]
    top2 = mx.topk(logits, 2, axis=-1)
    margin = mx.abs(top2[:, 0] - top2[:, 1])
    std = logits.std(axis=-1).mean().item()
    weight_bytes = sum(v for k, v in file_sizes(path).items() if k.endswith(".safetensors"))
    q = config.get("quantization")
    qdesc = f"{q['bits']}bit/g{q['group_size']}" if q else "none"
    stats = {
        "name": name,
        "dtype": config["torch_dtype"],
        "quant": qdesc,
        "files": len(list(path.iterdir())),
        "weight_bytes": weight_bytes,
        "distinct_per_prompt": distinct,
        "distinct_sequences": n_unique_seqs,
        "eos_in_greedy": n_eos,
        "logit_std": round(std, 2),
        "min_top2_margin": round(margin.min().item(), 4),
        "chat_tokens": last.generation_tokens,
        "chat_finish": last.finish_reason,
        "chat_text": text[:40],
    }
    ok = min(distinct) >= 8 and n_unique_seqs == len(CHECK_PROMPTS)
    return ok, stats, seqs


def write_readme(out_dir: Path):
    lines = [
        "# Test fixtures (generated: do not edit)",
        "",
        "Written by `scripts/make_fixtures.py` with mlx-lm itself (random weights, real",
        "mlx-community qwen3_moe format). Regenerate with `.venv/bin/python scripts/make_fixtures.py`.",
        "Greedy reference outputs: `scripts/oracle_generate.py`.",
        "",
        "Base shape: hidden 64, 3 layers, 4 q / 2 kv heads, head_dim 32, 8 experts top-2,",
        f"moe_intermediate 64, vocab {VOCAB_SIZE} (BPE {BPE_VOCAB} + <|endoftext|> {ENDOFTEXT_ID},",
        f"<|im_start|> {IM_START_ID}, <|im_end|> {IM_END_ID}). eos: config {IM_END_ID},",
        f"generation_config.json [{IM_END_ID}, {ENDOFTEXT_ID}]. Router `mlp.gate` is 8 bit / g64",
        "in every quantized fixture (qwen3_moe quant_predicate).",
        "",
        "| fixture | dtype | quantization | differs from base |",
        "| --- | --- | --- | --- |",
    ]
    for name, spec in FIXTURES.items():
        q = f"affine {spec['q'][0]} bit / g{spec['q'][1]}" if spec["q"] else "none"
        lines.append(f"| {name} | {spec['dtype']} | {q} | {spec.get('note', '')} |")
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "fixtures"))
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--show-seqs", action="store_true")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer()
    tok_src = out_dir / ".tokenizer-src"
    if tok_src.exists():
        shutil.rmtree(tok_src)
    write_tokenizer_src(tok, tok_src)

    names = args.only or list(FIXTURES)
    write_readme(out_dir)
    try:
        for name in names:
            write_fixture(name, FIXTURES[name], out_dir, tok_src)
    finally:
        shutil.rmtree(tok_src)

    if args.no_check:
        return
    all_ok = True
    total = 0
    for name in names:
        ok, stats, seqs = check_fixture(name, out_dir)
        total += sum(file_sizes(out_dir / name).values())
        all_ok &= ok
        print(("OK  " if ok else "BAD ") + json.dumps(stats, ensure_ascii=False))
        if args.show_seqs:
            for s in seqs:
                print("    ", s)
    print(f"total fixture bytes: {total}")
    if not all_ok:
        sys.exit("some fixture decodes too few distinct tokens")


if __name__ == "__main__":
    main()
