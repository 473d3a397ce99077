"""Session fixtures: this machine's variants, built once by the builder and loaded as users load them.

Kernel tests import the kernel through `kernels.get_local_kernel` on the built variant
directory, never by a private path. CUDA fixtures skip where no GPU is present.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def built_variants() -> dict[str, Path]:
    """backend -> build/<variant>/ for the CPU variant and, where a GPU is present, the CUDA variant."""
    import torch

    from flash_attn_kernel import compile, plan

    wanted = [v for v in plan.host_variants(ROOT)
              if v.backend == "cpu" or (v.backend == "cuda" and torch.cuda.is_available())]
    paths = compile.build(ROOT, [str(v) for v in wanted])
    return {plan.Variant.parse(p.name).backend: p for p in paths}


@pytest.fixture(scope="session")
def built_cpu_variant(built_variants: dict[str, Path]) -> Path:
    """The built CPU variant directory."""
    return built_variants["cpu"]


def _load(built_variants: dict[str, Path], backend: str):
    import kernels

    if backend not in built_variants:
        pytest.skip(f"no {backend} variant was built on this machine")
    return kernels.get_local_kernel(built_variants[backend])


@pytest.fixture(scope="session")
def kernel_cpu(built_variants):
    """The CPU variant, loaded through kernels.get_local_kernel."""
    return _load(built_variants, "cpu")


@pytest.fixture(scope="session")
def kernel_cuda(built_variants):
    """The CUDA variant, loaded through kernels.get_local_kernel (skips without a GPU)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    return _load(built_variants, "cuda")


@pytest.fixture(params=["cpu", "cuda"])
def device_kernel(request):
    """(kernel module, device) for every device present."""
    fixture = "kernel_cpu" if request.param == "cpu" else "kernel_cuda"
    return request.getfixturevalue(fixture), request.param
