"""Shared by the transformers and TRL tests: publish the kernel, skip reasons, error figures, call spies.

The tiny models, tokenizer and dataset come from examples/tiny_assets.py, which the examples use too.

The kernel reaches transformers the way a user's does: `publish_local` writes the built variants
to an embedded Hub repository (in a temporary directory, never the repository's .hub/), and
LOCAL_KERNELS maps the repo id to its version-branch checkout, so that
`from_pretrained(..., attn_implementation="<org>/flash-attn")` resolves it through `kernels`
without a network.
"""

from __future__ import annotations

import functools
import os
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from tiny_assets import (ARCHS, VOCAB, save_tiny_model, save_tokenizer, tiny_config,  # noqa: E402,F401
                         write_sft_dataset)  # (re-exported for the tests)

# Absolute floor of the error bounds: differences below it are float32 round-off, not kernel error.
ABS_FLOOR = 1e-4


@dataclass(frozen=True)
class PublishedKernel:
    """A published kernel that LOCAL_KERNELS makes loadable as `repo_id` (and its aliases)."""

    repo_id: str
    load_path: Path


def publish(built_variants: dict[str, Path], hub_dir: Path) -> PublishedKernel:
    """Publishes the session's built variants to an embedded repository under `hub_dir`."""
    from flash_attn_kernel.publish import publish_local

    result = publish_local(ROOT, hub_dir=hub_dir, variants=[p.name for p in built_variants.values()])
    return PublishedKernel(result.repo_id, Path(result.load_path))


@contextmanager
def local_kernels(kernel: PublishedKernel, *aliases: str) -> Iterator[None]:
    """Points LOCAL_KERNELS at the published checkout for `kernel.repo_id` and every alias repo id."""
    entries = ":".join(f"{repo}={kernel.load_path}" for repo in (kernel.repo_id, *aliases))
    old = os.environ.get("LOCAL_KERNELS")
    os.environ["LOCAL_KERNELS"] = entries
    try:
        yield
    finally:
        if old is None:
            del os.environ["LOCAL_KERNELS"]
        else:
            os.environ["LOCAL_KERNELS"] = old


def transformers_skip_reason() -> str | None:
    """Why transformers cannot load hub attention kernels here, or None when it can."""
    try:
        import transformers
        from transformers.utils import import_utils
    except ImportError:
        return "transformers is not installed (pip install -e '.[hf]')"
    if not import_utils.is_kernels_available():
        import kernels

        return (f"transformers {transformers.__version__} accepts kernels "
                f">={import_utils.KERNELS_MIN_VERSION},<{import_utils.KERNELS_MAX_VERSION}, "
                f"this environment has kernels {kernels.__version__} (transformers>=5.18 accepts 0.17)")
    return None


# The reference attention: sdpa where it computes the same function, eager where sdpa lacks a
# feature (attention softcap, sinks), as transformers itself does for those models.
REFERENCE_IMPL = {"gemma2": "eager", "gpt_oss": "eager"}


# -- error figures ---------------------------------------------------------------------------
def rel_err(x, ref) -> float:
    """||x - ref|| / ||ref|| in float64; NaN anywhere in x counts as an infinite error."""
    import torch

    x, ref = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x).all():
        return float("inf")
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def grad_vector(model):
    """Every parameter gradient of `model`, flattened into one float64 vector (missing grads as zeros)."""
    import torch

    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().flatten()
                      for _, p in sorted(model.named_parameters())])


# -- which kernel functions transformers called ----------------------------------------------
class KernelCallSpy:
    """Counts calls of the kernel functions transformers resolved, with the keyword arguments seen.

    transformers keeps the functions it took from the kernel module in module globals of
    modeling_flash_attention_utils after loading; wrapping them there observes exactly the calls
    the model makes, whatever path (dense, varlen, KV cache) it takes.
    """

    NAMES = {"_flash_fn": "flash_attn_func", "_flash_varlen_fn": "flash_attn_varlen_func",
             "_flash_with_kvcache_fn": "flash_attn_with_kvcache"}

    def __init__(self, monkeypatch) -> None:
        from transformers import modeling_flash_attention_utils as mfau

        self.calls: Counter[str] = Counter()
        self.kwargs: dict[str, set[str]] = {}
        for attr, name in self.NAMES.items():
            fn = getattr(mfau, attr)
            if fn is not None:
                monkeypatch.setattr(mfau, attr, self._wrap(name, fn))

    def _wrap(self, name: str, fn):
        # functools.wraps keeps the signature visible: transformers inspects it (e.g. for block_table).
        @functools.wraps(fn)
        def spy(*args, **kwargs):
            self.calls[name] += 1
            self.kwargs.setdefault(name, set()).update(k for k, v in kwargs.items() if v is not None)
            return fn(*args, **kwargs)
        return spy


def sft_skip_reason() -> str | None:
    """Why TRL's SFT cannot run here, or None when it can."""
    reason = transformers_skip_reason()
    if reason:
        return reason
    for module in ("trl", "datasets"):
        try:
            __import__(module)
        except ImportError as e:
            return f"{module} is not importable ({e}); pip install -e '.[hf]' (GPU machine: ci/fetch-device-wheels.sh)"
    return None


def liger_skip_reason() -> str | None:
    """Why Liger kernels cannot run here (they are Triton kernels for CUDA GPUs), or None."""
    import torch

    if not torch.cuda.is_available():
        return "liger-kernel runs Triton kernels on a CUDA GPU; this machine has none"
    try:
        import liger_kernel  # noqa: F401
    except ImportError as e:
        return f"liger-kernel is not importable ({e})"
    return None
