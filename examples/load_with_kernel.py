"""Load a causal LM with the published kernel as its attention, train a step and generate.

    # a local model directory (or a tiny one made here), the kernel from the local publish:
    LOCAL_KERNELS=your-org/flash-attn=$PWD/.hub/your-org/flash-attn/v1 \
        python examples/load_with_kernel.py [--model DIR] [--repo-id your-org/flash-attn]

    # the kernel from the Hub (a publisher you trust: --allow-all-kernels):
    python examples/load_with_kernel.py --model DIR --repo-id <org>/flash-attn --allow-all-kernels

Prints the logits' relative error against the same model with attn_implementation="sdpa"
(or "eager" for models sdpa cannot run: softcap, sinks) and the generated tokens of both.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tiny_assets import ARCHS, save_tiny_model

# transformers' own attention for a model whose features sdpa lacks
EAGER_ONLY = {"gemma2", "gpt_oss"}


def vouch_for_gpt_oss(repo_id: str) -> None:
    """Lets GPT-OSS (attention sinks) use our kernel.

    transformers replaces any attn_implementation naming "flash" that GPT-OSS does not list in
    `_compatible_flash_implementations` with the first one listed (kernels-community/vllm-flash-attn3);
    listing a kernel there is how a model vouches for it. Ours implements sinks (s_aux).
    """
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssPreTrainedModel

    listed = GptOssPreTrainedModel._compatible_flash_implementations
    if repo_id not in listed:
        GptOssPreTrainedModel._compatible_flash_implementations = [*listed, repo_id]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a saved model directory (default: a tiny random one, --arch)")
    parser.add_argument("--arch", choices=ARCHS, default="llama", help="architecture of the tiny default model")
    parser.add_argument("--repo-id", default="your-org/flash-attn", help="the kernel's Hub repo id")
    parser.add_argument("--allow-all-kernels", action="store_true",
                        help="load a kernel whose publisher the Hub does not mark trusted")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    vouch_for_gpt_oss(args.repo_id)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or save_tiny_model(args.arch, Path(tmp))
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=args.repo_id, dtype=torch.bfloat16,
                                                     allow_all_kernels=args.allow_all_kernels).to(device)
        kind = getattr(model.config, "model_type", "")
        reference_impl = "eager" if kind.replace("-", "_") in EAGER_ONLY else "sdpa"
        reference = AutoModelForCausalLM.from_pretrained(path, attn_implementation=reference_impl,
                                                         dtype=torch.float32).to(device)

    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (2, 32), device=device)
    out = model(ids, labels=ids)
    out.loss.backward()  # the kernel's backward
    with torch.no_grad():
        ref_logits = reference(ids).logits
    err = ((out.logits.float() - ref_logits).norm() / ref_logits.norm()).item()
    print(f"attn_implementation={model.config._attn_implementation!r} on {device}: loss {out.loss.item():.4f}, "
          f"logits relative error vs {reference_impl} float32 {err:.2e}")

    prompt = ids[:, :8]
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0  # left padding: transformers takes flash_attn_varlen_func
    with torch.no_grad():
        ours = model.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False)
        theirs = reference.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False)
    print(f"generated, kernel:            {ours[:, 8:].tolist()}")
    print(f"generated, {reference_impl + ' float32:':18} {theirs[:, 8:].tolist()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
