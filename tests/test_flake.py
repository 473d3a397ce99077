"""flake.nix parses and hands this repository to Hugging Face's kernel-builder as build.toml describes it.

Nix builds cannot run in CI, but Debian's nix-bin parses a flake offline: `bash ci/install-nix-parser.sh`
installs it under .cache/nix-parser (or set NIX_INSTANTIATE to a nix-instantiate binary).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _nix_instantiate() -> str | None:
    candidates = [os.environ.get("NIX_INSTANTIATE"), str(ROOT / ".cache/nix-parser/bin/nix-instantiate"),
                  shutil.which("nix-instantiate")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


NIX = _nix_instantiate()
pytestmark = pytest.mark.skipif(
    NIX is None, reason="no nix-instantiate: run `bash ci/install-nix-parser.sh` (or set NIX_INSTANTIATE)")


def parse(path: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    # Keep any nix state in the test's folder, whichever nix-instantiate this is.
    state = {name: str(tmp_path / "nix" / name.lower()) for name in
             ("NIX_STORE_DIR", "NIX_STATE_DIR", "NIX_LOG_DIR", "NIX_CONF_DIR")}
    for d in state.values():
        Path(d).mkdir(parents=True, exist_ok=True)
    Path(state["NIX_CONF_DIR"], "nix.conf").write_text("build-users-group =\n")
    return subprocess.run([NIX, "--parse", str(path)], capture_output=True, text=True,
                          env={**os.environ, **state, "HOME": str(tmp_path / "nix")})


def test_flake_parses_and_matches_build_toml(tmp_path: Path):
    proc = parse(ROOT / "flake.nix", tmp_path)
    assert proc.returncode == 0, proc.stderr
    ast = proc.stdout
    general = tomllib.loads((ROOT / "build.toml").read_text())["general"]
    assert general["name"] in re.search(r'description = "([^"]*)"', ast).group(1)
    url = re.search(r'kernel-builder = \{ url = "([^"]*)"; \}', ast)
    assert url and re.fullmatch(r"github:huggingface/kernels(/[\w.-]+)?", url.group(1)), ast
    call = re.search(r"genKernelFlakeOutputs \{(.*?)\}\)", ast)
    assert call, ast
    # `path` is what kernel-builder reads build.toml from: this directory. `self` gives the uid.
    assert re.search(rf"path = {re.escape(str(ROOT))};", call.group(1)), call.group(1)
    assert "inherit self" in call.group(1)


def test_a_broken_flake_is_caught(tmp_path: Path):
    broken = tmp_path / "flake.nix"
    broken.write_text((ROOT / "flake.nix").read_text().replace("inherit self;", "inherit self"))
    proc = parse(broken, tmp_path)
    assert proc.returncode != 0
    assert "syntax error" in proc.stderr
