"""The checks catch planted faults: torch C++ symbols in a stable-ABI variant, a tampered file."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from flash_attn_kernel import check, cli

STABLE = "torch-stable-abi211-cpu-x86_64-linux"
ID = "_tiny_kernel_cpu_abc1234"


def _shared_lib(path: Path, source: str) -> Path:
    src = path.with_suffix(".cpp")
    src.write_text(source)
    subprocess.run(["g++", "-shared", "-fPIC", "-o", str(path), str(src)], check=True)
    src.unlink()
    return path


def _variant(tmp_path: Path, name: str, lib_source: str) -> Path:
    """A variant directory with a real digest, whose module is built from `lib_source`."""
    from kernels._rust import Digest, DigestAlgorithm

    d = tmp_path / name
    d.mkdir()
    (d / "__init__.py").write_text("from ._ops import ops\n")
    (d / "_ops.py").write_text(f"import torch\nops = torch.ops.{ID}\n")
    _shared_lib(d / f"{ID}.abi3.so", lib_source)
    digest = Digest.hash_variant(DigestAlgorithm.SHA256, d)
    meta = {"name": "tiny-kernel", "id": ID, "version": 1, "license": "BSD-3-Clause", "python-depends": [],
            "kernel-depends": [], "backend": {"type": "cpu"},
            "digest": {"algorithm": "sha256", "files": digest.files}}
    (d / "metadata.json").write_text(json.dumps(meta))
    return d


CLEAN = """
extern "C" int aoti_torch_get_device_type(void*, int*);
namespace torch::stable { void helper(); }
int f(void* t) { int x; torch::stable::helper(); return aoti_torch_get_device_type(t, &x); }
"""
LEAKY = """
namespace c10 { namespace detail { void torchCheckFail(const char*); } }
void f() { c10::detail::torchCheckFail("x"); }
"""


def _result(report, name):
    return next(r for r in report.results if r.name == name)


def test_stable_abi_accepts_shims_and_torch_stable(tmp_path):
    report = check.check_variant(_variant(tmp_path, STABLE, CLEAN), import_check=False)
    assert _result(report, "stable-abi").passed is True
    assert _result(report, "digest").passed is True
    assert report.ok


def test_stable_abi_catches_c10_symbol_and_names_it(tmp_path):
    report = check.check_variant(_variant(tmp_path, STABLE, LEAKY), import_check=False)
    result = _result(report, "stable-abi")
    assert result.passed is False
    assert "c10::detail::torchCheckFail" in result.detail and f"{ID}.abi3.so" in result.detail
    assert not report.ok


def test_full_abi_variant_is_not_held_to_the_stable_rule(tmp_path):
    report = check.check_variant(_variant(tmp_path, "torch213-cxx11-cpu-x86_64-linux", LEAKY), import_check=False)
    assert all(r.name != "stable-abi" for r in report.results)


def test_digest_catches_tampered_and_added_files(tmp_path):
    d = _variant(tmp_path, STABLE, CLEAN)
    (d / "__init__.py").write_text("from ._ops import ops\nimport os\n")
    (d / "extra.py").write_text("")
    result = _result(check.check_variant(d, import_check=False), "digest")
    assert result.passed is False
    assert "__init__.py" in result.detail and "extra.py" in result.detail


def test_check_command_fails_on_a_bad_variant(tmp_path, capsys):
    (tmp_path / "build").mkdir()
    _variant(tmp_path / "build", STABLE, LEAKY)
    assert cli.main(["--project", str(tmp_path), "check", "--no-import"]) == 1
    assert "c10::detail::torchCheckFail" in capsys.readouterr().out


def test_check_command_on_empty_directory(tmp_path, capsys):
    assert cli.main(["--project", str(tmp_path), "check"]) == 1
    assert "no build variants" in capsys.readouterr().err


@pytest.mark.parametrize(
    "demangled, name",
    [
        ("c10::detail::torchCheckFail(char const*)", "c10::detail::torchCheckFail(char const*)"),
        ("at::Tensor at::empty<int>(long)", "at::empty<int>(long)"),
        ("typeinfo for c10::Error", "c10::Error"),
        ("std::vector<at::Tensor, std::allocator<at::Tensor> >::size() const",
         "std::vector<at::Tensor, std::allocator<at::Tensor> >::size() const"),
        ("aoti_torch_empty_strided", "aoti_torch_empty_strided"),
    ],
)
def test_qualified_name(demangled, name):
    assert check.qualified_name(demangled) == name
