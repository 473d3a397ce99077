#!/usr/bin/env python3
"""Helpers of the release workflow (.github/workflows/release.yml); each runs locally too.

    python ci/release.py matrix [--project DIR]          build matrix: one job per variant group
    python ci/release.py check-tag TAG [--project DIR]   the tag's major version is build.toml's version
    python ci/release.py gather ARTIFACTS BUILD          merge downloaded build artifacts into BUILD/
    python ci/release.py repo-id [--project DIR]         the Hub repository to publish to (never the placeholder)

Variant groups share a toolchain and a container: all CPU variants build together; CUDA variants
group by toolkit. Every group builds in PyTorch's manylinux_2_28 builder image, which keeps the
binaries within that policy's glibc/libstdc++ symbols. CUDA 12.x builds need that image's full
toolkit (NVIDIA's cu12 wheels have no nvcc driver); CPU and CUDA 13.x builds use its `cpu` tag,
and the builder assembles nvcc 13.x from NVIDIA's wheels.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

MANYLINUX_IMAGE = "pytorch/manylinux2_28-builder:cpu"
# The same image with a full CUDA toolkit, one tag per CUDA version (cuda12.6, cuda12.8).
CUDA12_IMAGE = "pytorch/manylinux2_28-builder:cuda{major}.{minor}"
# The interpreter inside these images (they have every CPython under /opt/python).
CONTAINER_PYTHON = "/opt/python/cp312-cp312/bin/python3"
# cu<MAJOR><MINOR> with a one-digit minor, as in variant names (cu128 = CUDA 12.8).
_CUDA_RE = re.compile(r"-cu(?P<major>\d{2})(?P<minor>\d)-")
# A release tag: v<major>, optionally followed by .<minor>[.<patch>...] or a suffix (v1, v1.2.0, v1-rc1).
_TAG_RE = re.compile(r"^v(?P<major>\d+)(?:[.-].*)?$")


def variant_groups(variants: list[str]) -> list[dict]:
    """Matrix entries: {group, variants (space-separated), image, python, cpu_tests}."""
    groups: dict[str, list[str]] = {}
    for name in variants:
        m = _CUDA_RE.search(name)
        key = f"cu{m['major']}{m['minor']}" if m else "cpu"
        groups.setdefault(key, []).append(name)
    entries = []
    for key, names in sorted(groups.items()):
        m = re.fullmatch(r"cu(\d{2})(\d)", key)
        image = CUDA12_IMAGE.format(major=m[1], minor=m[2]) if m and m[1] == "12" else MANYLINUX_IMAGE
        entries.append({"group": key, "variants": " ".join(sorted(names)), "image": image,
                        "python": CONTAINER_PYTHON, "cpu_tests": key == "cpu"})
    return entries


def planned_variants(project: Path) -> list[str]:
    """Every variant build.toml and the support policy imply (`flash-attn-kernel variants --json`)."""
    proc = subprocess.run([sys.executable, "-m", "flash_attn_kernel", "--project", str(project), "variants", "--json"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"release: `flash-attn-kernel variants --json` failed:\n{proc.stderr}")
    return [row["variant"] for row in json.loads(proc.stdout)["variants"]]


def cmd_matrix(args: argparse.Namespace) -> int:
    matrix = {"include": variant_groups(planned_variants(Path(args.project)))}
    text = json.dumps(matrix)
    print(json.dumps(matrix, indent=2))
    if os.environ.get("GITHUB_OUTPUT"):
        with open(os.environ["GITHUB_OUTPUT"], "a") as out:
            out.write(f"matrix={text}\n")
    return 0


def cmd_check_tag(args: argparse.Namespace) -> int:
    version = tomllib.loads((Path(args.project) / "build.toml").read_text())["general"]["version"]
    m = _TAG_RE.match(args.tag)
    if m is None:
        sys.exit(f"release: tag {args.tag!r} is not v<major>[.<minor>...]; expected v{version} or v{version}.x.y")
    if int(m["major"]) != version:
        sys.exit(f"release: tag {args.tag} is major version {m['major']}, but build.toml's general.version is "
                 f"{version}; builds publish to branch v{version}. Bump general.version or tag v{version}.x.y")
    print(f"release: tag {args.tag} publishes version {version} (branch v{version})")
    return 0


def cmd_gather(args: argparse.Namespace) -> int:
    """Copy ARTIFACTS/<artifact>/<variant>/ (and check reports) into BUILD/; a variant found twice must match."""
    artifacts, build = Path(args.artifacts), Path(args.build)
    build.mkdir(parents=True, exist_ok=True)
    found = sorted(p.parent for p in artifacts.glob("*/*/metadata.json"))
    if not found:
        sys.exit(f"release: no build artifacts (<artifact>/<variant>/metadata.json) under {artifacts}")
    for variant in found:
        target = build / variant.name
        if target.exists():
            same = filecmp.dircmp(variant, target)
            if same.left_only or same.right_only or same.diff_files:
                sys.exit(f"release: variant {variant.name} came from two jobs with different files "
                         f"({variant} and {target})")
            continue
        shutil.copytree(variant, target)
        report = variant.with_name(f"{variant.name}.check.json")
        if report.is_file():
            shutil.copy2(report, build / report.name)
        print(f"release: gathered {variant.name} from {variant.parent.name}")
    return 0


def cmd_repo_id(args: argparse.Namespace) -> int:
    """HF_REPO_ID, else build.toml's general.hub.repo-id; a release never goes to the placeholder."""
    general = tomllib.loads((Path(args.project) / "build.toml").read_text())["general"]
    repo_id = os.environ.get("HF_REPO_ID") or general.get("hub", {}).get("repo-id", "")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id) or repo_id.startswith("your-org/"):
        sys.exit(f"release: no Hub repository to publish to (got {repo_id!r}); set the repository variable "
                 "HF_REPO_ID (e.g. my-org/flash-attn) or general.hub.repo-id in build.toml")
    print(repo_id)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("matrix", help="print the build matrix (and write it to $GITHUB_OUTPUT)")
    p.add_argument("--project", default=".")
    p.set_defaults(func=cmd_matrix)
    p = sub.add_parser("check-tag", help="refuse a tag whose major version is not build.toml's version")
    p.add_argument("tag")
    p.add_argument("--project", default=".")
    p.set_defaults(func=cmd_check_tag)
    p = sub.add_parser("gather", help="merge downloaded build artifacts into a build/ directory")
    p.add_argument("artifacts")
    p.add_argument("build")
    p.set_defaults(func=cmd_gather)
    p = sub.add_parser("repo-id", help="print the Hub repository a release publishes to")
    p.add_argument("--project", default=".")
    p.set_defaults(func=cmd_repo_id)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
