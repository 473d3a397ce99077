"""The main job: build for this machine, verify, publish locally, load back through `kernels`.

This is what the README's first command runs. Each stage is the same code its own
subcommand runs; this module only strings them together and proves the result by loading
the published kernel the way users do and running one attention call per backend present.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from .errors import PipelineError

# Runs in a fresh interpreter so the loader sees the published repository exactly as a
# user's process would (nothing already imported from build/).
_LOAD_AND_CALL = r"""
import json, sys, torch, kernels
from flash_attn_kernel.reference import attention_ref
repo_id, version = sys.argv[1], int(sys.argv[2])
results = []
devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
for device in devices:
    backend = "cpu" if device == "cpu" else None
    fa = kernels.get_kernel(repo_id, version=version, backend=backend)
    dtype = torch.bfloat16
    q, k, v = (torch.randn(2, 256, 8, 64, device=device, dtype=dtype) for _ in range(3))
    out = fa.flash_attn_func(q, k, v, causal=True)
    ref, _ = attention_ref(q, k, v, causal=True, compute_dtype=torch.float32)
    lowp, _ = attention_ref(q, k, v, causal=True)  # the same math in bf16: DESIGN.md's yardstick
    err = (out.float() - ref).abs().max().item()
    bound = 2 * (lowp.float() - ref).abs().max().item() + 1e-3
    ok = bool(torch.isfinite(out).all()) and err <= bound
    results.append({"device": device, "module": fa.__name__, "max_abs_err": err, "bound": bound, "ok": ok})
print(json.dumps(results))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: all cores)")
    parser.add_argument("--variant", action="append", default=None, metavar="NAME",
                        help="build only this variant (repeatable; default: every variant this machine can build)")


def run(args: argparse.Namespace) -> int:
    from . import compile as build_stage
    from . import publish as publish_stage

    project = Path(args.project).resolve()

    print("== build and verify")
    paths = build_stage.build(project, args.variant, jobs=args.jobs)
    for path in paths:
        print(f"   built {path.relative_to(project)}")

    print("== publish to the embedded local repository")
    published = publish_stage.publish_local(project)
    print(f"   {published.summary()}")

    print("== load back through kernels and run attention")
    local_kernels = f"{published.repo_id}={published.load_path}"
    env = dict(os.environ, LOCAL_KERNELS=local_kernels, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", _LOAD_AND_CALL, published.repo_id, str(published.version)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PipelineError("loading the published kernel through kernels failed",
                            where=f"LOCAL_KERNELS={local_kernels}",
                            fix="see the error above:\n" + proc.stderr.strip()[-3000:])
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in results:
        status = "ok" if r["ok"] else "WRONG"
        print(f"   {r['device']:4s} {r['module']}: flash_attn_func max |err| vs fp32 reference {r['max_abs_err']:.2e} "
              f"(bound {r['bound']:.2e}: 2x bf16 math + 1e-3)  {status}")
    if not all(r["ok"] for r in results):
        raise PipelineError("the published kernel loaded but its output does not match reference attention")
    print(f"done: LOCAL_KERNELS={local_kernels} makes "
          f"get_kernel({published.repo_id!r}, version={published.version}) load this build")
    return 0
