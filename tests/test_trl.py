"""TRL trains with the published kernel: SFTTrainer and `trl sft`, with and without Liger kernels.

The model (a tiny Llama or Qwen3 with random weights), its word-level tokenizer and the dataset are
made here and saved locally; TRL loads the model by path with `attn_implementation="<org>/flash-attn"`,
which transformers resolves through `kernels` (LOCAL_KERNELS points at the published checkout).
Liger's Triton kernels need a CUDA GPU: those cases skip elsewhere, with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hf_support import (KernelCallSpy, liger_skip_reason, local_kernels, publish, save_tiny_model, save_tokenizer,
                        sft_skip_reason, write_sft_dataset)

_reason = sft_skip_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

STEPS = 16


@pytest.fixture(scope="module")
def published(built_variants, tmp_path_factory):
    """The kernel published to a temporary embedded repository, loadable by its repo id."""
    kernel = publish(built_variants, tmp_path_factory.mktemp("hub"))
    with local_kernels(kernel):
        yield kernel


@pytest.fixture(scope="module")
def sft_files(tmp_path_factory):
    """(arch -> model directory with tokenizer, dataset directory)."""
    root = tmp_path_factory.mktemp("sft")
    models = {}
    for arch in ("llama", "qwen3"):
        models[arch] = save_tiny_model(arch, root)
        save_tokenizer(models[arch])
    return models, write_sft_dataset(root / "data")


def sft_config(output_dir, repo_id: str, *, liger: bool, packing: bool):
    """The SFTConfig the tests and examples/trl_sft.py use: a few steps at a high constant learning rate."""
    import torch
    from trl import SFTConfig

    return SFTConfig(output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=3e-3,
                     lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no",
                     max_length=64, packing=packing, use_liger_kernel=liger, bf16=True,
                     use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, seed=0,
                     model_init_kwargs={"attn_implementation": repo_id, "dtype": "float32"})


def assert_decreasing(losses: list[float]) -> None:
    assert len(losses) == STEPS, losses
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert all(x == x for x in losses), f"NaN loss: {losses}"
    assert last < 0.8 * first, f"loss did not decrease: {losses}"


@pytest.mark.parametrize("liger", [False, True], ids=["no-liger", "liger"])
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_sft_trainer(published, sft_files, arch, packing, liger, tmp_path, monkeypatch):
    """SFTTrainer(model=<path>, SFTConfig(model_init_kwargs={"attn_implementation": repo}, use_liger_kernel=...))
    trains with decreasing loss, and every attention call went to our kernel."""
    if liger and liger_skip_reason():
        pytest.skip(liger_skip_reason())
    from datasets import load_dataset
    from trl import SFTTrainer

    models, data = sft_files
    dataset = load_dataset(str(data), split="train")
    trainer = SFTTrainer(model=str(models[arch]), train_dataset=dataset,
                         args=sft_config(tmp_path, published.repo_id, liger=liger, packing=packing))
    assert trainer.model.config._attn_implementation == published.repo_id
    spy = KernelCallSpy(monkeypatch)
    trainer.train()
    if liger:  # Liger patches module instances in place; _get_name reports the Liger class
        assert trainer.model.model.norm._get_name() == "LigerRMSNorm", "use_liger_kernel did not patch the model"
    assert_decreasing([h["loss"] for h in trainer.state.log_history if "loss" in h])
    # at least one call per layer and step (gradient checkpointing, on by default in TRL, repeats them)
    n_calls = STEPS * trainer.model.config.num_hidden_layers
    if packing:  # BFD packing trains padding-free: one packed row per batch, told apart by position_ids
        assert set(spy.calls) == {"flash_attn_varlen_func"} and spy.calls["flash_attn_varlen_func"] >= n_calls, \
            dict(spy.calls)
    else:  # padded batches: unpadded into varlen (or dense where a batch has no padding)
        assert sum(spy.calls.values()) >= n_calls and spy.calls["flash_attn_varlen_func"] > 0, dict(spy.calls)


def test_trl_cli_sft(published, sft_files, tmp_path):
    """`trl sft --attn_implementation <repo> [--use_liger_kernel]` trains with decreasing loss
    (Liger on a CUDA GPU only)."""
    models, data = sft_files
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "trl.cli.main", "sft",
           "--model_name_or_path", str(models["llama"]), "--dataset_name", str(data),
           "--attn_implementation", published.repo_id, "--dtype", "float32",
           "--output_dir", str(out), "--max_steps", str(STEPS), "--per_device_train_batch_size", "8",
           "--learning_rate", "3e-3", "--lr_scheduler_type", "constant", "--logging_steps", "1",
           "--max_length", "64", "--bf16", "true", "--report_to", "none", "--seed", "0",
           "--save_strategy", "steps", "--save_steps", str(STEPS), "--num_processes", "1"]
    if liger_skip_reason() is None:
        cmd.append("--use_liger_kernel")
    else:
        cmd.append("--use_cpu")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert_decreasing([h["loss"] for h in state["log_history"] if "loss" in h])


@pytest.mark.parametrize("script", ["trl_sft.py", "trl_sft_cli.sh"])
def test_examples_run(published, script, tmp_path):
    """examples/trl_sft.py and examples/trl_sft_cli.sh run as docs/transformers-trl.md shows."""
    from hf_support import ROOT

    path = ROOT / "examples" / script
    if script.endswith(".py"):
        cmd = [sys.executable, str(path), "--packing", "--repo-id", published.repo_id]
        if liger_skip_reason() is None:
            cmd.append("--liger")
    else:
        cmd = ["bash", str(path), str(tmp_path)]
    # the scripts call python3: this interpreter's
    env = dict(os.environ, REPO_ID=published.repo_id, PYTHONPATH=os.pathsep.join(sys.path),
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
