"""Benchmark the built kernel against every attention peer present, in one process on one device.

Peers: PyTorch SDPA's flash, cuDNN, efficient and math backends (CUDA), SDPA's CPU flash
kernel and math path (CPU). Each point reports latency, TFLOP/s (DESIGN.md's convention:
forward 4*b*s_q*s_k*h*d, halved for causal; backward 2.5x forward) and peak memory, and
the run is written to benchmarks/results/<name>.json with the card and versions.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import PipelineError

OPS = ("fwd", "bwd", "fwdbwd")


@dataclass
class Record:
    impl: str
    op: str
    dtype: str
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_kv: int
    hdim: int
    causal: bool
    ms: float | None
    tflops: float | None
    gbps: float | None
    peak_mem_bytes: int | None
    error: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="device to benchmark (default: cuda when present, else cpu)")
    parser.add_argument("--name", default=None, help="results file name under benchmarks/results/ (default: derived)")
    parser.add_argument("--ops", default="fwd,bwd", help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--hdims", default=None, help="comma-separated head dims (default: 64,128,256 on CUDA, 64,128 on CPU)")
    parser.add_argument("--seqlens", default=None, help="comma-separated sequence lengths")
    parser.add_argument("--dtypes", default=None, help="comma-separated dtypes (default: bf16 on CUDA, fp32,bf16 on CPU)")
    parser.add_argument("--tokens", type=int, default=None, help="batch * seqlen (default: 16384 on CUDA, 4096 on CPU)")
    parser.add_argument("--hidden", type=int, default=2048, help="heads * head_dim (default: 2048)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per point (median reported)")
    parser.add_argument("--peers", default=None, help="comma-separated peer subset (default: all present)")


def run(args: argparse.Namespace) -> int:
    import torch

    project = Path(args.project).resolve()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("--device cuda was asked for but torch sees no CUDA device")
    cuda = device == "cuda"
    ops = _split(args.ops, str)
    for op in ops:
        if op not in OPS:
            raise PipelineError(f"--ops: unknown op {op!r}", fix=f"choose from {', '.join(OPS)}")
    hdims = _split(args.hdims, int) if args.hdims else ([64, 128, 256] if cuda else [64, 128])
    seqlens = _split(args.seqlens, int) if args.seqlens else (
        [512, 1024, 2048, 4096, 8192, 16384] if cuda else [512, 1024, 2048, 4096])
    dtypes = _split(args.dtypes, str) if args.dtypes else (["bf16"] if cuda else ["fp32", "bf16"])
    tokens = args.tokens or (16384 if cuda else 4096)
    repeats = args.repeats or (30 if cuda else 5)

    kernel = _load_kernel(project, device)
    impls = _implementations(kernel, device)
    if args.peers:
        wanted = set(_split(args.peers, str))
        impls = {name: fn for name, fn in impls.items() if name.startswith("flash-attn-kernel") or name in wanted}

    records: list[Record] = []
    points = [(dt, d, s, c, op) for dt in dtypes for d in hdims for s in seqlens for c in (False, True) for op in ops]
    for i, (dtype_name, hdim, seqlen, causal, op) in enumerate(points, 1):
        batch = max(1, tokens // seqlen)
        heads = max(1, args.hidden // hdim)
        print(f"[{i}/{len(points)}] {op} {dtype_name} hdim={hdim} seqlen={seqlen} batch={batch} heads={heads} "
              f"causal={causal}", flush=True)
        for name, fn in impls.items():
            rec = _measure(fn, name, op, dtype_name, batch, seqlen, heads, hdim, causal, device, repeats)
            records.append(rec)
            shown = f"{rec.ms:8.3f} ms {rec.tflops:7.3g} TFLOP/s" if rec.ms is not None else f"skipped: {rec.error}"
            print(f"    {name:28s} {shown}", flush=True)

    name = args.name or f"attention-{device}-{_slug(_device_name(device))}-{_dt.date.today().isoformat()}"
    out = project / "benchmarks" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "device": _device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "clocks": _clocks() if cuda else None,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "flash-attn-kernel bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else " ".join(sys.argv),
        "git": _git_commit(project),
        "records": [asdict(r) for r in records],
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown_table(doc))
    print(markdown_table(doc))
    print(f"wrote {out.relative_to(project)} and {out.with_suffix('.md').name}")
    return 0


def _split(text: str, cast):
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()


def _device_name(device: str) -> str:
    import platform

    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def _clocks() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_commit(project: Path) -> str | None:
    proc = subprocess.run(["git", "-C", str(project), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or None


def _load_kernel(project: Path, device: str):
    """The built kernel for `device`, loaded through `kernels` as users load it."""
    import kernels

    build = project / "build"
    if not build.is_dir():
        raise PipelineError("no build/ directory to benchmark", fix="run `flash-attn-kernel build` first")
    return kernels.get_local_kernel(build, backend="cpu" if device == "cpu" else None)


def _implementations(kernel, device: str) -> dict:
    """name -> fn(q, k, v, causal) for our kernel and every SDPA backend usable on `device`."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    ours = "flash-attn-kernel[cpu]" if device == "cpu" else "flash-attn-kernel[sm80]"
    impls = {ours: lambda q, k, v, causal: kernel.flash_attn_func(q, k, v, causal=causal)}

    def sdpa_with(backend):
        def fn(q, k, v, causal):
            # SDPA takes (batch, heads, seqlen, dim); transposes are views, as a model would pass them.
            with sdpa_kernel(backend):
                return sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)
        return fn

    if device == "cuda":
        impls["sdpa-flash"] = sdpa_with(SDPBackend.FLASH_ATTENTION)
        impls["sdpa-cudnn"] = sdpa_with(SDPBackend.CUDNN_ATTENTION)
        impls["sdpa-efficient"] = sdpa_with(SDPBackend.EFFICIENT_ATTENTION)
    else:
        impls["sdpa-flash"] = sdpa_with(SDPBackend.FLASH_ATTENTION)
        impls["sdpa-math"] = sdpa_with(SDPBackend.MATH)
    return impls


def _flops(op: str, batch: int, seqlen: int, heads: int, hdim: int, causal: bool) -> float:
    fwd = 4.0 * batch * seqlen * seqlen * heads * hdim / (2.0 if causal else 1.0)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwdbwd": 3.5 * fwd}[op]


def _measure(fn, impl: str, op: str, dtype_name: str, batch: int, seqlen: int, heads: int, hdim: int,
             causal: bool, device: str, repeats: int) -> Record:
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    rec = Record(impl, op, dtype_name, batch, seqlen, seqlen, heads, heads, hdim, causal, None, None, None, None)
    cuda = device == "cuda"
    try:
        # Fresh random inputs (never zeros: they hide unwritten outputs and can run faster).
        q, k, v = (torch.randn(batch, seqlen, heads, hdim, device=device, dtype=dtype, requires_grad=op != "fwd")
                   for _ in range(3))
        if op == "fwd":
            def step():
                with torch.no_grad():
                    fn(q, k, v, causal)
        else:
            out = fn(q, k, v, causal)
            grad = torch.randn_like(out)
            if op == "bwd":
                def step():
                    torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
            else:
                def step():
                    torch.autograd.grad(fn(q, k, v, causal), (q, k, v), grad)
        step()  # warm-up: module load, autotuning, handle creation
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times = []
        for _ in range(repeats):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
        rec.ms = statistics.median(times)
        rec.tflops = _flops(op, batch, seqlen, heads, hdim, causal) / (rec.ms * 1e-3) / 1e12
        if cuda:
            rec.peak_mem_bytes = torch.cuda.max_memory_allocated() - base
    except (RuntimeError, NotImplementedError, ValueError) as err:
        rec.error = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return rec


def markdown_table(doc: dict) -> str:
    """A markdown table of a results document: TFLOP/s per point, and our ratio to the best peer."""
    by_point: dict[tuple, dict[str, float | None]] = {}
    for r in doc["records"]:
        key = (r["op"], r["dtype"], r["hdim"], r["seqlen_q"], r["causal"])
        by_point.setdefault(key, {})[r["impl"]] = r["tflops"]
    impls = sorted({r["impl"] for r in doc["records"]}, key=lambda n: (not n.startswith("flash-attn-kernel"), n))
    ours = [n for n in impls if n.startswith("flash-attn-kernel")]
    lines = [f"{doc['device']} · torch {doc['torch']} · CUDA {doc['cuda']} · {doc['date']}", "",
             "| op | dtype | hdim | seqlen | causal | " + " | ".join(impls) + " | ours / best peer |",
             "|" + "---|" * (len(impls) + 6)]
    for (op, dtype, hdim, seqlen, causal), vals in sorted(by_point.items()):
        cells = [f"{vals[n]:.3g}" if vals.get(n) else "—" for n in impls]
        peers = [v for n, v in vals.items() if n not in ours and v]
        ratio = f"{vals[ours[0]] / max(peers):.2f}x" if ours and vals.get(ours[0]) and peers else "—"
        lines.append(f"| {op} | {dtype} | {hdim} | {seqlen} | {causal} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines) + "\n"
