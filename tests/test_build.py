"""A real build of the tiny fixture kernel's CPU variant for the host torch, loaded back through kernels."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flash_attn_kernel import compile, plan
from flash_attn_kernel.errors import PipelineError
from flash_attn_kernel.project import load

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_kernel"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(project copy, its built host CPU variant). The copy has no git, so its uid is random."""
    project = tmp_path_factory.mktemp("tiny") / "tiny_kernel"
    shutil.copytree(FIXTURE, project)
    (variant,) = plan.host_variants(project)
    (built,) = compile.build(project, [str(variant)], jobs=2)
    return project, built


def test_layout_matches_kernel_builder(tiny):
    project, built = tiny
    meta = json.loads((built / "metadata.json").read_text())
    ops = meta["id"]
    assert ops.startswith("_tiny_kernel_cpu_")
    assert sorted(p.name for p in built.iterdir()) == sorted(["__init__.py", "_ops.py", f"{ops}.abi3.so", "metadata.json"])
    assert list(meta) == ["name", "id", "version", "license", "python-depends", "kernel-depends", "backend",
                          "digest", "provenance"]
    assert meta["backend"] == {"type": "cpu"}
    assert set(meta["digest"]["files"]) == {"__init__.py", "_ops.py", f"{ops}.abi3.so"}
    assert f"ops = torch.ops.{ops}" in (built / "_ops.py").read_text()


def test_loads_through_kernels_and_op_runs(tiny):
    project, built = tiny
    code = (
        "import pathlib, sys, torch, kernels\n"
        "m = kernels.get_local_kernel(pathlib.Path(sys.argv[1]), backend='cpu')\n"
        "a, b = torch.randn(7), torch.randn(7)\n"
        "assert torch.allclose(m.scaled_add(a, b, 2.5), a + 2.5 * b)\n"
        "print(m.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(project)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == json.loads((built / "metadata.json").read_text())["id"]


def test_no_glibc_2_32_single_threaded_symbol(tiny):
    # The manylinux fix: libstdc++ must read our private flag, not glibc's __libc_single_threaded.
    glibc = tuple(int(x) for x in platform.libc_ver()[1].split(".")[:2] if x.isdigit())
    if glibc >= (2, 38):
        pytest.skip(f"glibc {platform.libc_ver()[1]} headers add other post-2.28 symbols: such a host makes "
                    "local, non-redistributable builds whatever this fix does")
    _, built = tiny
    (so,) = built.glob("*.abi3.so")
    symbols = subprocess.run(["nm", "-D", str(so)], capture_output=True, text=True, check=True).stdout
    assert "__libc_single_threaded" not in symbols
    rpath = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True).stdout
    assert "RPATH" not in rpath and "RUNPATH" not in rpath


def test_compile_error_names_file_and_keeps_earlier_build(tiny):
    project, built = tiny
    before = (built / "metadata.json").read_text()
    src = project / "csrc" / "tiny" / "scaled_add.cpp"
    good = src.read_text()
    src.write_text(good.replace("out[i] = a[i]", "out[i] = undefined_name + a[i]"))
    try:
        with pytest.raises(PipelineError) as err:
            compile.build(project, [built.name], jobs=2)
    finally:
        src.write_text(good)
    text = str(err.value)
    assert "csrc/tiny/scaled_add.cpp" in text and "undefined_name" in text
    assert "build.log" in text
    assert (built / "metadata.json").read_text() == before
    assert not list(built.parent.glob(".staging-*"))


def test_missing_source_is_reported_before_compiling(tiny, tmp_path):
    project, _ = tiny
    copy = tmp_path / "k"
    shutil.copytree(project, copy, ignore=shutil.ignore_patterns("_build", "build"))
    (copy / "csrc" / "tiny" / "scaled_add.cpp").unlink()
    with pytest.raises(PipelineError, match="csrc/tiny/scaled_add.cpp"):
        compile.build(copy, None, jobs=2)


def test_unknown_variant_is_rejected(tiny):
    project, _ = tiny
    with pytest.raises(PipelineError, match="did you mean"):
        compile.build(project, ["torch213-cxx11-cpu-x86_64-linx"])


def test_project_reads_fixture():
    p = load(FIXTURE)
    assert p.python_name == "tiny_kernel" and p.backends == ("cpu",)
    assert p.kernels_for("cpu")[0].compiled_sources() == ("csrc/tiny/scaled_add.cpp",)


CUDA_FIXTURE = Path(__file__).parent / "fixtures" / "tiny_cuda"


def test_stable_abi_cuda_variant_with_host_nvcc(tmp_path, monkeypatch):
    from flash_attn_kernel import toolchain

    monkeypatch.delenv("FLASH_ATTN_CUDA_ARCHS", raising=False)

    host = toolchain.host_cuda()
    if host is None:
        pytest.skip("no CUDA toolkit (nvcc) on this machine")
    project = tmp_path / "tiny_cuda"
    shutil.copytree(CUDA_FIXTURE, project)
    name = f"torch-stable-abi211-cu{host.version[0]}{host.version[1]}-x86_64-linux"
    assert name in [str(v) for v in plan.host_variants(project)]
    (built,) = compile.build(project, [name], jobs=2)
    meta = json.loads((built / "metadata.json").read_text())
    # 9.0a keeps its suffix: Hopper-only code needs sm_90a, not sm_90.
    assert meta["backend"] == {"type": "cuda", "archs": ["8.0", "9.0a"]}
    ninja = (project / "_build" / f"cuda-{host.version[0]}.{host.version[1]}" / "build" / "build.ninja").read_text()
    assert "-gencode=arch=compute_90a,code=sm_90a" in ninja and "TORCH_TARGET_VERSION=0x020b000000000000" in ninja
    (so,) = built.glob("*.abi3.so")
    dynamic = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True).stdout
    # Resolved at load time from the CUDA torch already imported; nothing else, no RPATH.
    assert f"libcudart.so.{host.version[0]}" in dynamic and "libtorch_cuda.so" in dynamic
    assert "RPATH" not in dynamic and "RUNPATH" not in dynamic
    import torch

    if not torch.cuda.is_available():
        return
    code = (
        "import pathlib, sys, torch, kernels\n"
        "m = kernels.get_local_kernel(pathlib.Path(sys.argv[1]))\n"
        "x = torch.arange(1000, device='cuda', dtype=torch.float32)\n"
        "assert torch.equal(m.scale_(x.clone(), 3.0), x * 3.0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(project)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
