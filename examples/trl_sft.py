"""Supervised fine-tuning with TRL's SFTTrainer on the published kernel, optionally with Liger kernels.

    LOCAL_KERNELS=your-org/flash-attn=$PWD/.hub/your-org/flash-attn/v1 \
        python examples/trl_sft.py [--model DIR] [--dataset DIR] [--liger] [--packing] [--steps 16]

Without --model/--dataset, a tiny Llama, its tokenizer and a small text dataset are made in a
temporary directory (examples/tiny_assets.py). --liger (use_liger_kernel) needs a CUDA GPU and
liger-kernel; --packing trains padding-free (packed rows, flash_attn_varlen_func). Prints the loss
of every step.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tiny_assets import save_tiny_model, save_tokenizer, write_sft_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a saved model directory with its tokenizer (default: tiny Llama)")
    parser.add_argument("--dataset", type=Path, help="a dataset directory load_dataset reads, with a 'text' column")
    parser.add_argument("--repo-id", default="your-org/flash-attn", help="the kernel's Hub repo id")
    parser.add_argument("--liger", action="store_true", help="use_liger_kernel=True (CUDA GPU only)")
    parser.add_argument("--packing", action="store_true", help="pack sequences and train padding-free")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps")
    args = parser.parse_args(argv)

    import torch
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            model_dir = save_tiny_model("llama", Path(tmp))
            save_tokenizer(model_dir)
        dataset = load_dataset(str(args.dataset or write_sft_dataset(Path(tmp) / "data")), split="train")
        config = SFTConfig(
            output_dir=str(Path(tmp) / "out"), max_steps=args.steps, per_device_train_batch_size=8,
            learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=1, report_to="none",
            save_strategy="no", max_length=64, packing=args.packing, use_liger_kernel=args.liger, bf16=True,
            use_cpu=not torch.cuda.is_available(),
            model_init_kwargs={"attn_implementation": args.repo_id, "dtype": "float32"})
        trainer = SFTTrainer(model=str(model_dir), args=config, train_dataset=dataset)
        print(f"attn_implementation={trainer.model.config._attn_implementation!r}, "
              f"liger={args.liger}, packing={args.packing}")
        trainer.train()
    losses = [round(h["loss"], 3) for h in trainer.state.log_history if "loss" in h]
    print(f"loss per step: {losses}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
