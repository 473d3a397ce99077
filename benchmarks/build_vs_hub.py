"""Build from source vs Hub kernel: the time to a working kernel each way, and that both run equally fast.

From source: this project's builder compiles one variant (this machine's) in a cold scratch copy
of the project, as a user who clones the sources would (`flash-attn-kernel build --variant V`).
From the Hub: that build published to an embedded repository (publish_local, the main job's
path), then loaded in a fresh process with `kernels.get_kernel(repo_id, version=N)` through
LOCAL_KERNELS. A real Hub download adds the variant's size over the user's network; the size
is recorded.

Speed: the same shape timed in fresh processes, alternating the two loads (A B A B ...), each
process timing its kernel; the two medians must agree within noise.

    python benchmarks/build_vs_hub.py [--variant NAME] [--jobs N] [--rounds 3]

Writes benchmarks/results/<name>.json and <name>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flash_attn_kernel import bench  # noqa: E402

# Runs in a fresh interpreter: what a user's process pays to get the kernel, then its speed.
_LOAD_AND_TIME = r"""
import json, statistics, sys, time
t0 = time.perf_counter()
import torch, kernels
t_import = time.perf_counter() - t0
how, where, device, shape, repeats = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5])
backend = "cpu" if device == "cpu" else None
t0 = time.perf_counter()
if how == "hub":
    repo_id, version = where.rsplit("@", 1)
    fa = kernels.get_kernel(repo_id, version=int(version), backend=backend)
else:
    from pathlib import Path
    fa = kernels.get_local_kernel(Path(where), backend=backend)
t_load = time.perf_counter() - t0
dtype = getattr(torch, shape["dtype"])
q, k, v = (torch.randn(shape["batch"], shape["seqlen"], shape["heads"], shape["hdim"], device=device, dtype=dtype,
                       requires_grad=True) for _ in range(3))
grad = torch.randn_like(q)
def step():
    out = fa.flash_attn_func(q, k, v, causal=shape["causal"])
    torch.autograd.grad(out, (q, k, v), grad)
def sync():
    if device == "cuda":
        torch.cuda.synchronize()
t0 = time.perf_counter(); step(); sync(); t_first = time.perf_counter() - t0
times = []
for _ in range(repeats):
    t0 = time.perf_counter(); step(); sync(); times.append((time.perf_counter() - t0) * 1e3)
print("RESULT " + json.dumps({"import_s": t_import, "load_s": t_load, "first_call_s": t_first,
                              "ms": statistics.median(times), "module": fa.__name__, "file": getattr(fa, "__file__", None)}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--project", default=str(REPO), help="kernel project (default: this repository)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when present")
    p.add_argument("--variant", default=None, help="variant to build (default: this machine's for --device)")
    p.add_argument("--jobs", type=int, default=None, help="compile jobs (default: all cores)")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per load path (default: 3)")
    p.add_argument("--repeats", type=int, default=None, help="timed fwd+bwd calls per process (default: 30 CUDA, 5 CPU)")
    p.add_argument("--name", default=None, help="results name under benchmarks/results/ (default: derived)")
    return p.parse_args(argv)


def host_variant(project: Path, device: str) -> str:
    from flash_attn_kernel import plan

    for v in plan.host_variants(project):
        if (v.backend == "cpu") == (device == "cpu"):
            return str(v)
    raise SystemExit(f"this machine builds no {device} variant (flash-attn-kernel variants says why)")


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and "__pycache__" not in f.parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from flash_attn_kernel.publish import publish_local

    project = Path(args.project).resolve()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    variant = args.variant or host_variant(project, device)
    shape = ({"batch": 2, "seqlen": 4096, "heads": 16, "hdim": 128, "dtype": "bfloat16", "causal": True} if cuda else
             {"batch": 1, "seqlen": 512, "heads": 4, "hdim": 64, "dtype": "float32", "causal": True})
    repeats = args.repeats or (30 if cuda else 5)
    env = bench.environment(device)
    name = args.name or f"build-vs-hub-{device}-{bench._slug(env['device'])}-{env['date'][:10]}"
    out = REPO / "benchmarks" / "results" / f"{name}.json"
    doc = {"kind": "build-vs-hub", **env, "command": " ".join(["python", "benchmarks/build_vs_hub.py", *sys.argv[1:]]),
           "git": bench.git_commit(project), "variant": variant, "cores": len(os.sched_getaffinity(0)),
           "jobs": args.jobs, "cuda_archs_override": os.environ.get("FLASH_ATTN_CUDA_ARCHS"),
           "speed_shape": {**shape, "op": "fwd+bwd"}, "rounds": args.rounds, "repeats": repeats}

    with tempfile.TemporaryDirectory(prefix="build-vs-hub-") as tmp:
        scratch = Path(tmp) / project.name
        # A cold copy: no earlier objects (_build/), builds, local repository or environment.
        shutil.copytree(project, scratch, ignore=shutil.ignore_patterns(
            "_build", "build", ".git", ".hub", ".venv", ".whl", ".cache", "__pycache__", "results"))
        cmd = [sys.executable, "-m", "flash_attn_kernel", "--project", str(scratch), "build", "--variant", variant]
        if args.jobs:
            cmd += ["--jobs", str(args.jobs)]
        print(f"== build from source: flash-attn-kernel build --variant {variant}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        doc["build_s"] = time.perf_counter() - t0
        if proc.returncode != 0:
            doc["error"] = f"build failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-1500:]}"
            _write(doc, out)
            print(doc["error"])
            return 1
        print(f"   {doc['build_s']:.1f} s", flush=True)
        built = scratch / "build" / variant
        doc["variant_bytes"] = _tree_bytes(built)
        _write(doc, out)  # a call cut short later still keeps the build time

        print("== publish to an embedded repository", flush=True)
        t0 = time.perf_counter()
        published = publish_local(scratch, hub_dir=Path(tmp) / "hub", variants=[variant])
        doc["publish_s"] = time.perf_counter() - t0
        doc["repo_id"] = published.repo_id
        doc["summary"] = {}
        where = {"hub": f"{published.repo_id}@{published.version}", "source": str(scratch / "build")}
        load_env = dict(os.environ, LOCAL_KERNELS=f"{published.repo_id}={published.load_path}", HF_HUB_OFFLINE="1")
        load_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

        print(f"== load and time, {args.rounds} fresh processes each, alternating", flush=True)
        runs: dict[str, list[dict]] = {"source": [], "hub": []}
        for r in range(args.rounds):
            for how in ("source", "hub"):
                proc = subprocess.run([sys.executable, "-c", _LOAD_AND_TIME, how, where[how], device, json.dumps(shape),
                                       str(repeats)], env=load_env, capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    runs[how].append({"error": (proc.stderr or proc.stdout).strip()[-800:]})
                    print(f"   {how} round {r + 1}: failed\n{runs[how][-1]['error']}", flush=True)
                    continue
                res = json.loads(lines[-1][7:])
                runs[how].append(res)
                doc["runs"], doc["summary"] = runs, summarize(runs, doc["build_s"])
                _write(doc, out)
                print(f"   {how:6s} round {r + 1}: get_kernel {res['load_s']:.2f} s, first call {res['first_call_s']:.2f} s, "
                      f"fwd+bwd {res['ms']:.3f} ms  ({res['module']})", flush=True)
        doc["runs"] = runs
        doc["summary"] = summarize(runs, doc["build_s"])
    _write(doc, out)
    print(markdown(doc))
    print(f"wrote {out.relative_to(REPO)} and {out.with_suffix('.md').name}")
    return 0


def summarize(runs: dict[str, list[dict]], build_s: float) -> dict:
    """Medians per load path, the speed ratio and its spread (what "identical within noise" is judged by)."""
    summary = {}
    for how, results in runs.items():
        ok = [r for r in results if "ms" in r]
        if ok:
            summary[how] = {key: statistics.median(r[key] for r in ok) for key in ("load_s", "first_call_s", "ms")}
            summary[how]["ms_spread"] = (max(r["ms"] for r in ok) - min(r["ms"] for r in ok)) / summary[how]["ms"]
    if "source" in summary and "hub" in summary:
        summary["speed_ratio_hub_over_source"] = summary["source"]["ms"] / summary["hub"]["ms"]
        noise = max(summary["source"]["ms_spread"], summary["hub"]["ms_spread"], 0.02)
        summary["identical_within_noise"] = abs(summary["speed_ratio_hub_over_source"] - 1) <= noise
        summary["time_to_kernel_source_s"] = build_s + summary["source"]["load_s"]
        summary["time_to_kernel_hub_s"] = summary["hub"]["load_s"]
    return summary


def _write(doc: dict, out: Path) -> None:
    bench.write_results(out, doc, markdown(doc))


def markdown(doc: dict) -> str:
    lines = [bench.header_line(doc), "", f"    {doc['command']}", ""]
    if doc.get("error"):
        return "\n".join(lines + [f"**Failed:** {doc['error']}", ""])
    s = doc.get("summary", {})
    shape = doc["speed_shape"]
    if "publish_s" not in doc:
        return "\n".join(lines + [f"Built `{doc['variant']}` in {doc['build_s']:.1f} s; nothing loaded yet.", ""])
    lines += [f"Variant `{doc['variant']}` ({doc['variant_bytes'] / 2**20:.1f} MiB), {doc['cores']} cores.", "",
              "| | from source (builder) | from the Hub repository (`kernels.get_kernel`) |", "|---|---:|---:|",
              f"| build | {doc['build_s']:.1f} s | — (published once: {doc['publish_s']:.1f} s) |"]
    if "source" in s and "hub" in s:
        lines += [f"| load in a fresh process | {s['source']['load_s']:.2f} s | {s['hub']['load_s']:.2f} s |",
                  f"| time to a working kernel | {s['time_to_kernel_source_s']:.1f} s | {s['time_to_kernel_hub_s']:.2f} s "
                  f"+ download of {doc['variant_bytes'] / 2**20:.1f} MiB |",
                  f"| first call | {s['source']['first_call_s']:.2f} s | {s['hub']['first_call_s']:.2f} s |",
                  f"| fwd+bwd, {shape['dtype']} b{shape['batch']} s{shape['seqlen']} h{shape['heads']} d{shape['hdim']}"
                  f"{' causal' if shape['causal'] else ''} | {s['source']['ms']:.3f} ms | {s['hub']['ms']:.3f} ms |",
                  "", f"Speed, Hub over source: {s['speed_ratio_hub_over_source']:.3f}x "
                  f"({'identical within noise' if s['identical_within_noise'] else 'NOT within noise'}: spread across "
                  f"processes {100 * s['source']['ms_spread']:.1f}% / {100 * s['hub']['ms_spread']:.1f}%)."]
    else:
        lines.append("Loads not measured (the run stopped, or a load failed: see `runs` in the JSON).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
