"""Variant names, the build matrix and build.toml errors (no compiler needed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flash_attn_kernel import plan
from flash_attn_kernel.errors import PipelineError
from flash_attn_kernel.plan import Variant, intersect_archs
from flash_attn_kernel.project import load

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "tiny_kernel"


@pytest.mark.parametrize(
    "name",
    [
        "torch213-cxx11-cpu-x86_64-linux",
        "torch211-cxx11-cu126-x86_64-linux",
        "torch215-cxx11-cu132-aarch64-linux",
        "torch-stable-abi211-cu130-x86_64-linux",
        "torch-stable-abi29-cu128-x86_64-linux",
    ],
)
def test_variant_round_trip(name):
    assert str(Variant.parse(name)) == name


def test_variant_fields():
    v = Variant.parse("torch-stable-abi211-cu130-x86_64-linux")
    assert (v.torch, v.stable_abi, v.backend, v.cuda) == ((2, 11), True, "cuda", (13, 0))
    c = Variant.parse("torch213-cxx11-cpu-x86_64-linux")
    assert (c.torch, c.stable_abi, c.backend, c.cuda) == ((2, 13), False, "cpu", None)


@pytest.mark.parametrize(
    "name",
    [
        "torch213-cpu-x86_64-linux",  # no cxx11 tag on Linux
        "torch213-cxx11-cuda130-x86_64-linux",
        "torch213-cxx11-cpu-x86_64-darwin",
        "torch-stable-abi211-cu130-x86_64",
        "torch-universal",
        "",
    ],
)
def test_variant_rejects_bad_names(name):
    with pytest.raises(ValueError, match="is not torch"):
        Variant.parse(name)


def test_arch_loose_intersection():
    caps = ["8.0", "8.6", "8.9", "9.0", "10.0", "12.0"]
    # CUDA 12.6 builds up to 9.0: Blackwell capabilities drop out.
    assert intersect_archs(caps, (12, 6)) == ("8.0", "8.6", "8.9", "9.0")
    assert intersect_archs(caps, (13, 0)) == ("8.0", "8.6", "8.9", "9.0", "10.0", "12.0")
    # Arch-specific capabilities survive when their base arch is built.
    assert intersect_archs(["8.0", "9.0a"], (13, 0)) == ("8.0", "9.0a")
    # 8.7 in the toolkit list picks the highest capability of the same major below it.
    assert intersect_archs(["8.0"], (13, 0)) == ("8.0",)


def test_matrix_of_this_repository():
    names = {str(p.variant): p for p in plan.matrix(load(ROOT))}
    cpu = {f"torch2{m}-cxx11-cpu-x86_64-linux" for m in (11, 12, 13, 14, 15)}
    cuda = {f"torch-stable-abi211-cu{c}-x86_64-linux" for c in (126, 128, 130, 132)}
    assert set(names) == cpu | cuda
    assert names["torch-stable-abi211-cu126-x86_64-linux"].archs == ("8.0", "8.6", "8.9", "9.0a")
    assert names["torch-stable-abi211-cu130-x86_64-linux"].archs == ("8.0", "8.6", "8.9", "9.0a", "10.0", "12.0")


def test_cuda12_is_not_buildable_without_a_host_toolkit(monkeypatch):
    from flash_attn_kernel import toolchain

    monkeypatch.setattr(toolchain, "host_cuda", lambda: None)
    a = toolchain.availability(Variant.parse("torch-stable-abi211-cu126-x86_64-linux"))
    assert not a.buildable and "CUDA 12.6 toolkit" in a.how
    assert toolchain.availability(Variant.parse("torch-stable-abi211-cu132-x86_64-linux")).buildable


def test_unknown_variant_lists_close_names():
    project = load(FIXTURE)
    with pytest.raises(PipelineError) as err:
        plan.select(project, ["torch213-cxx11-cpu-x86_64-linu"])
    assert "torch213-cxx11-cpu-x86_64-linux" in str(err.value)
    with pytest.raises(PipelineError, match="not one of the variants"):
        plan.select(project, ["torch-stable-abi211-cu130-x86_64-linux"])  # fixture is CPU-only


def test_bad_build_toml_shows_kernels_message(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "k")
    toml = tmp_path / "k" / "build.toml"
    toml.write_text(toml.read_text().replace('name = "tiny-kernel"', 'name = "Tiny_Kernel"'))
    with pytest.raises(PipelineError) as err:
        load(tmp_path / "k")
    assert "Invalid kernel name" in str(err.value) and "Tiny_Kernel" in str(err.value)
    assert str(toml) in str(err.value)


def test_missing_build_toml(tmp_path):
    with pytest.raises(PipelineError, match="no build.toml"):
        load(tmp_path)


def test_variants_command_marks_the_host_default(capsys):
    import json

    from flash_attn_kernel import cli
    from flash_attn_kernel.toolchain import host_torch

    assert cli.main(["--project", str(FIXTURE), "variants", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["variants"]
    assert [r["variant"] for r in rows] == [f"torch2{m}-cxx11-cpu-x86_64-linux" for m in (11, 12, 13, 14, 15)]
    major, minor = host_torch().minor
    assert [r["variant"] for r in rows if r["default"]] == [f"torch{major}{minor}-cxx11-cpu-x86_64-linux"]
    assert all(r["buildable"] for r in rows)
