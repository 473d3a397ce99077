"""Build times: the first variant of each (backend, toolkit) group, then each further torch variant.

The first build of a group compiles the kernel sources; every further torch variant of the
group reuses those objects and compiles only its binding. The project is copied to a
scratch directory so the measurement starts cold and leaves your _build/ and build/ alone.
Toolchains are fetched (or found in the cache) before any timing starts.

    python benchmarks/build_times.py [--project .] [--variant NAME ...] [--jobs N]

Writes benchmarks/results/build-times-<host>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flash_attn_kernel import compile, plan, toolchain  # noqa: E402
from flash_attn_kernel.project import load  # noqa: E402


def _git(project: Path) -> str | None:
    """HEAD's commit, with `-dirty` when the measured tree differs from it."""
    proc = subprocess.run(["git", "-C", str(project), "rev-parse", "HEAD"], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    status = subprocess.run(["git", "-C", str(project), "status", "--porcelain"], capture_output=True, text=True)
    return proc.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default=str(REPO), help="kernel project (default: this repository)")
    parser.add_argument("--variant", action="append",
                        help="variants to time, in order (default: every buildable CPU variant, then the host's CUDA ones)")
    parser.add_argument("--jobs", type=int, default=None, help="compile jobs (default: all cores)")
    args = parser.parse_args()

    project = Path(args.project).resolve()
    proj = load(project)
    if args.variant:
        names = args.variant
    else:
        buildable = [p.variant for p in plan.matrix(proj) if toolchain.availability(p.variant).buildable]
        cpu = [v for v in buildable if v.backend == "cpu"]
        host_cuda = [v for v in plan.host_variants(project) if v.backend == "cuda"]
        names = [str(v) for v in cpu + host_cuda]
    for name in names:
        toolchain.resolve(plan.Variant.parse(name))

    records = []
    seen_groups: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="build-times-") as tmp:
        scratch = Path(tmp) / project.name
        shutil.copytree(project, scratch, ignore=shutil.ignore_patterns("_build", "build", ".git", "__pycache__"))
        for name in names:
            v = plan.Variant.parse(name)
            group = "cpu" if v.cuda is None else f"cuda-{v.cuda_str}"
            start = time.perf_counter()
            compile.build(scratch, [name], jobs=args.jobs)
            seconds = time.perf_counter() - start
            records.append({"variant": name, "group": group, "seconds": round(seconds, 2),
                            "kernel_objects_reused": group in seen_groups})
            seen_groups.add(group)
            print(f"{name}: {seconds:.1f} s" + (" (kernel objects reused)" if records[-1]["kernel_objects_reused"] else ""))

    host = platform.node() or "host"
    out = REPO / "benchmarks" / "results" / f"build-times-{host}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "host": host,
        "cores": len(os.sched_getaffinity(0)),
        "jobs": args.jobs,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "git": _git(project),
        "nvcc": [f"{c.version[0]}.{c.version[1]}" for c in [toolchain.host_cuda()] if c],
        "records": records,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
