#!/usr/bin/env bash
# TRL's command line with the published kernel as attention, plus Liger kernels on a CUDA GPU.
#   usage: LOCAL_KERNELS=your-org/flash-attn=$PWD/.hub/your-org/flash-attn/v1 bash examples/trl_sft_cli.sh [WORK_DIR]
# Makes a tiny Llama, its tokenizer and a dataset in WORK_DIR (examples/tiny_assets.py), then runs
#   trl sft ... --attn_implementation your-org/flash-attn [--use_liger_kernel]
# REPO_ID overrides the repo id; without a CUDA GPU it trains on the CPU without Liger.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${1:-$(mktemp -d)}
python3 "$here/tiny_assets.py" "$work"
if python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  device_args=(--use_liger_kernel)
else
  device_args=(--use_cpu)
fi
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python3 -m trl.cli.main sft \
  --model_name_or_path "$work/llama" --dataset_name "$work/data" \
  --attn_implementation "${REPO_ID:-your-org/flash-attn}" --dtype float32 \
  --max_steps 16 --per_device_train_batch_size 8 --learning_rate 3e-3 --lr_scheduler_type constant \
  --max_length 64 --bf16 true --logging_steps 1 --report_to none --save_strategy no \
  --output_dir "$work/out" --num_processes 1 "${device_args[@]}"
