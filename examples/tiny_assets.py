"""Tiny real-architecture models, a tokenizer and an SFT dataset, made locally (no Hub download).

Used by the examples and by tests/test_transformers.py and tests/test_trl.py. As a script, writes
a model directory (weights, config, tokenizer) and a dataset directory:

    python examples/tiny_assets.py OUT_DIR [--arch llama]
    -> OUT_DIR/<arch>/ (from_pretrained / --model_name_or_path), OUT_DIR/data/train.jsonl (--dataset_name OUT_DIR/data)
"""

from __future__ import annotations

import argparse
from pathlib import Path

VOCAB = 256
SLIDING_WINDOW = 8


def tiny_config(arch: str):
    """A 2-layer config of `arch` with GQA (4 query heads, 2 KV heads, head_dim 16), random weights.

    llama, qwen2, qwen3: plain causal attention. gemma2: sliding window on every other layer and
    attention softcap. gemma3: sliding window, query-key norm. gpt_oss: sliding window and
    attention sinks (s_aux), mixture of experts (every token to both experts, so that bf16 rounding
    cannot flip a routing decision). Weights are drawn at std 0.2 so that attention is far from
    uniform and the softcap (2.0) bends the scores.
    """
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    windowed = dict(sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention"])
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "qwen3":
        return tf.Qwen3Config(**common)
    if arch == "gemma2":
        return tf.Gemma2Config(**common, **windowed, attn_logit_softcapping=2.0, final_logit_softcapping=None,
                               query_pre_attn_scalar=16)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**common, **windowed, query_pre_attn_scalar=16)
    if arch == "gpt_oss":
        # GPT-OSS's YaRN rope, its scaling factor consistent with the short context
        rope = dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
                    truncate=False, original_max_position_embeddings=common["max_position_embeddings"] // 32)
        return tf.GptOssConfig(**{**common, "intermediate_size": 64}, **windowed, num_local_experts=2,
                               num_experts_per_tok=2, rope_parameters=rope)
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


ARCHS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "gpt_oss")

def save_tiny_model(arch: str, directory: Path, seed: int = 0) -> Path:
    """Saves a randomly initialized tiny `arch` model (float32 weights) with save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="eager")
    path = directory / arch
    model.save_pretrained(path)
    return path


# -- a tokenizer and a dataset for SFT ---------------------------------------------------------
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: pad, bos, eos as in tiny_config
WORDS = ("the a one cat dog bird fish cow sat ran flew swam slept on in under near by mat log tree pond barn "
         "red blue green small big old young happy quiet loud . and then").split()


def save_tokenizer(directory: Path) -> None:
    """Saves a word-level tokenizer over WORDS (fits VOCAB) next to a model, as AutoTokenizer loads it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *WORDS])}
    assert len(vocab) <= VOCAB
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.save_pretrained(directory)


def sentences(n: int, seed: int = 0) -> list[str]:
    """n short texts from a small grammar: varied enough to be data, regular enough to learn in a few steps."""
    import random

    rng = random.Random(seed)
    animals, verbs, places = WORDS[3:8], WORDS[8:13], WORDS[18:23]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 3)):
            parts.append(f"the {rng.choice(WORDS[23:30])} {rng.choice(animals)} {rng.choice(verbs)} "
                         f"{rng.choice(WORDS[13:18])} the {rng.choice(places)} .")
        out.append(" then ".join(parts))
    return out


def write_sft_dataset(directory: Path, n: int = 64) -> Path:
    """A language-modeling dataset (one "text" column) as train.jsonl, which load_dataset(directory) reads."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "train.jsonl", "w") as f:
        for text in sentences(n):
            f.write(json.dumps({"text": text}) + "\n")
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to write the model and dataset into")
    parser.add_argument("--arch", choices=ARCHS, default="llama", help="architecture of the tiny model")
    args = parser.parse_args(argv)
    model_dir = save_tiny_model(args.arch, args.out_dir)
    save_tokenizer(model_dir)
    data_dir = write_sft_dataset(args.out_dir / "data")
    print(f"model: {model_dir}\ndataset: {data_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
