"""Benchmark the built kernel against every attention peer present, in one process on one device.

Peers: PyTorch SDPA's flash, cuDNN, efficient and math backends (CUDA), SDPA's CPU flash kernel
and math path (CPU), FlexAttention (torch.compile'd, causal through a block mask) and
transformers' eager attention. Ops: forward, backward, forward+backward, and decode (one query
token over a paged KV cache through `flash_attn_with_kvcache`, against SDPA on the same shape
with a contiguous cache).

Every point reports latency, TFLOP/s (DESIGN.md's convention: forward 4*b*s_q*s_k*h*d, halved
for causal; backward 2.5x forward), peak memory, and for decode the K/V bytes read per second.
The run is written to benchmarks/results/<name>.json after every point (a run cut short keeps
what it measured), with a markdown table beside it and PNG plots at the end.

On a CPU the implementations of a point are timed in turn, one call each per round (interleaved),
so that a noisy stretch of a shared machine slows every implementation alike instead of one of
them; on CUDA (quiet, event-timed) each is timed in one go unless --interleave asks otherwise.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from .errors import PipelineError

OPS = ("fwd", "bwd", "fwdbwd", "decode")
CUDA_PEERS = ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "flex", "eager")
CPU_PEERS = ("sdpa-flash", "sdpa-math", "flex", "eager")
# Decode compares against SDPA on a contiguous cache only: flex and eager are training-shape peers.
CUDA_DECODE_PEERS = ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient")
CPU_DECODE_PEERS = ("sdpa-flash", "sdpa-math")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": "float8_e4m3fn"}
# FP8 (e4m3 in, bfloat16 out) is a CUDA forward of ours alone: SDPA's backends take no FP8 inputs.
FP8_OPS = ("fwd",)

MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() during the timed calls minus memory_allocated() before them "
            "(inputs, and for bwd the forward's saved tensors, are not counted)",
    "cpu": "peak resident set size (VmHWM, reset through /proc/self/clear_refs) during the timed calls minus the "
           "resident size before them; glibc's mmap threshold is pinned to 128 KiB so freed buffers go back to "
           "the system and every call's large buffers are counted",
}


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
    repeats: int | None = None
    page_size: int | None = None


@dataclass(frozen=True)
class Point:
    """One shape of one op; every implementation runs on it in turn."""

    op: str
    dtype: str
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_kv: int
    hdim: int
    causal: bool
    page_size: int | None = None

    def describe(self) -> str:
        heads = f"h{self.heads_q}" if self.heads_q == self.heads_kv else f"h{self.heads_q}:{self.heads_kv}"
        extra = f" page{self.page_size}" if self.page_size else ""
        return (f"{self.op} {self.dtype} d{self.hdim} s{self.seqlen_q}/{self.seqlen_k} b{self.batch} {heads}"
                f"{' causal' if self.causal else ''}{extra}")


@dataclass
class Settings:
    """How long each point is timed, and whether its implementations take turns call by call."""

    repeats: int
    min_repeats: int
    point_seconds: float
    warmup: int = 1
    warmup_seconds: float = 0.0
    interleave: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="device to benchmark (default: cuda when present, else cpu)")
    parser.add_argument("--name", default=None, help="results file name under benchmarks/results/ (default: derived)")
    parser.add_argument("--ops", default="fwd,bwd", help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--hdims", default=None, help="comma-separated head dims (default: 64,128,256 on CUDA, 64,128 on CPU)")
    parser.add_argument("--seqlens", default=None, help="comma-separated sequence lengths")
    parser.add_argument("--dtypes", default=None, help="comma-separated dtypes (default: bf16,fp16 on CUDA, fp32,bf16 on CPU)")
    parser.add_argument("--causal", default="both", choices=("both", "true", "false"), help="masks to run (default: both)")
    parser.add_argument("--tokens", type=int, default=None, help="batch * seqlen (default: 16384 on CUDA, 4096 on CPU)")
    parser.add_argument("--hidden", type=int, default=2048, help="heads * head_dim (default: 2048)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="most timed calls per point and implementation (median reported; default: 30 on CUDA, "
                             "9 on CPU)")
    parser.add_argument("--min-repeats", type=int, default=3, help="fewest timed calls per point (default: 3)")
    parser.add_argument("--point-seconds", type=float, default=None,
                        help="stop timing an implementation on a point once its calls took this many seconds "
                             "and --min-repeats calls are done (default: 1.0 on CUDA, 8.0 on CPU)")
    parser.add_argument("--warmup-seconds", type=float, default=None,
                        help="before timing an implementation on a point, call it for at least this long, so that "
                             "the card's clocks have ramped up whichever implementation runs first (default: 0.1 "
                             "on CUDA, 0 on CPU)")
    parser.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                        help="time the implementations of a point in turn, one call each per round, so that noise "
                             "from other work on the machine hits them alike (default: on for CPU, off for CUDA)")
    parser.add_argument("--peers", default=None,
                        help=f"comma-separated peers (default: every one present: {','.join(CUDA_PEERS)} on CUDA, "
                             f"{','.join(CPU_PEERS)} on CPU; decode: SDPA backends only)")
    parser.add_argument("--without-ours", action="store_true",
                        help="measure only the peers (to add a peer to an earlier run with --append)")
    parser.add_argument("--label", default=None,
                        help="name of our kernel in the results (default: flash-attn-kernel[cuda] on CUDA, "
                             "flash-attn-kernel[cpu] on CPU)")
    parser.add_argument("--decode-batch", type=int, default=None, help="decode batch (default: 64 on CUDA, 4 on CPU)")
    parser.add_argument("--decode-cache", type=int, default=None, help="decode cache length (default: 8192 on CUDA, 2048 on CPU)")
    parser.add_argument("--decode-heads", default="32:8", help="decode query:kv heads (default: 32:8)")
    parser.add_argument("--decode-hdim", type=int, default=128, help="decode head dim (default: 128)")
    parser.add_argument("--page-size", type=int, default=256, help="decode KV cache page size (default: 256)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="start no new point after this many seconds; what ran is recorded")
    parser.add_argument("--append", action="store_true",
                        help="add to the records of an existing --name file instead of replacing it")
    parser.add_argument("--render", metavar="JSON", default=None,
                        help="measure nothing: rewrite the markdown and plots of a recorded results file")


def run(args: argparse.Namespace) -> int:
    if args.render:
        path = Path(args.render)
        doc = json.loads(path.read_text())
        written = write_outputs(doc, path)
        print("wrote " + ", ".join(p.name for p in written))
        return 0

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
    dtypes = _split(args.dtypes, str) if args.dtypes else (["bf16", "fp16"] if cuda else ["fp32", "bf16"])
    for dt in dtypes:
        if dt == "fp8" and not cuda:
            raise PipelineError("--dtypes fp8: the FP8 forward runs on CUDA (sm90) only", fix="use --device cuda")
        if dt not in DTYPES:
            raise PipelineError(f"--dtypes: unknown dtype {dt!r}", fix=f"choose from {', '.join(DTYPES)}")
    peers = _split(args.peers, str) if args.peers is not None else None
    known = set(CUDA_PEERS) | set(CPU_PEERS)
    for p in peers or []:
        if p not in known:
            raise PipelineError(f"--peers: unknown peer {p!r}", fix=f"choose from {', '.join(sorted(known))}")
    points = plan_points(args, device, ops, dtypes)
    settings = Settings(repeats=args.repeats or (30 if cuda else 9), min_repeats=max(1, args.min_repeats),
                        point_seconds=args.point_seconds if args.point_seconds is not None else (1.0 if cuda else 8.0),
                        warmup_seconds=max(0.0, args.warmup_seconds if args.warmup_seconds is not None
                                           else (0.1 if cuda else 0.0)),
                        interleave=args.interleave if args.interleave is not None else not cuda)
    label = args.label or ("flash-attn-kernel[cuda]" if cuda else "flash-attn-kernel[cpu]")

    if not cuda:
        _pin_mmap_threshold()
    kernel = _load_kernel(project, device)
    name = args.name or f"attention-{device}-{_slug(_device_name(device))}-{_dt.date.today().isoformat()}"
    out = project / "benchmarks" / "results" / f"{name}.json"
    results = ResultsFile(out, describe_run(device, kernel, settings, project,
                                             command_line(getattr(args, "argv", sys.argv[1:]))), append=args.append)

    # `timeout` sends SIGTERM: turn it into the same orderly stop as Ctrl-C, so the outputs get written.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    started = time.monotonic()
    interrupted = False
    try:
        for i, point in enumerate(points, 1):
            if args.time_budget is not None and time.monotonic() - started > args.time_budget:
                results.note_skipped(len(points) - i + 1, f"time budget of {args.time_budget:.0f} s spent")
                print(f"time budget of {args.time_budget:.0f} s spent: {len(points) - i + 1} of {len(points)} points "
                      "not run", flush=True)
                break
            print(f"[{i}/{len(points)}] {point.describe()}", flush=True)
            impls = implementations(kernel, device, point.op, label, peers if point.dtype != "fp8" else [])
            if args.without_ours:
                impls.pop(label)
            for rec in measure_point(impls, point, device, settings):
                results.add(rec)
                print(f"    [{i}/{len(points)}] {rec.impl:26s} {_figure(rec)}", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        results.note_skipped(None, "interrupted")
        print("interrupted: writing what was measured", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        results.finish()
    written = write_outputs(results.doc, out)
    print(markdown_table(results.doc))
    print(f"wrote {out.relative_to(project)} and " + ", ".join(p.name for p in written))
    return 130 if interrupted else 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _figure(rec: Record) -> str:
    if rec.ms is None:
        return f"skipped: {rec.error}"
    parts = [f"{rec.ms:9.3f} ms"]
    if rec.op == "decode":
        parts.append(f"{rec.ms * 1e3:8.1f} us {rec.gbps:7.1f} GB/s")
    else:
        parts.append(f"{rec.tflops:7.2f} TFLOP/s")
    if rec.peak_mem_bytes is not None:
        parts.append(f"peak {rec.peak_mem_bytes / 2**20:9.1f} MiB")
    return "  ".join(parts) + f"  (n={rec.repeats})"


# -- the grid ------------------------------------------------------------------------------------
def plan_points(args: argparse.Namespace, device: str, ops: list[str], dtypes: list[str]) -> list[Point]:
    """Every point of the run, dtype-major so that a run cut short has whole dtypes."""
    cuda = device == "cuda"
    hdims = _split(args.hdims, int) if args.hdims else ([64, 128, 256] if cuda else [64, 128])
    seqlens = _split(args.seqlens, int) if args.seqlens else (
        [512, 1024, 2048, 4096, 8192, 16384] if cuda else [512, 1024, 2048, 4096])
    causals = {"both": (False, True), "true": (True,), "false": (False,)}[args.causal]
    tokens = args.tokens or (16384 if cuda else 4096)
    points = []
    for dt in dtypes:
        for d in hdims:
            heads = max(1, args.hidden // d)
            for s in seqlens:
                for c in causals:
                    for op in ops:
                        if op != "decode" and (dt != "fp8" or op in FP8_OPS):
                            points.append(Point(op, dt, max(1, tokens // s), s, s, heads, heads, d, c))
        if "decode" in ops and dt != "fp8":
            hq, hkv = (int(x) for x in args.decode_heads.split(":"))
            if hq % hkv:
                raise PipelineError(f"--decode-heads {args.decode_heads}: query heads must be a multiple of kv heads")
            cache = args.decode_cache or (8192 if cuda else 2048)
            if cache % args.page_size:
                raise PipelineError(f"--decode-cache {cache} is not a multiple of --page-size {args.page_size}")
            points.append(Point("decode", dt, args.decode_batch or (64 if cuda else 4), 1, cache, hq, hkv,
                                args.decode_hdim, True, args.page_size))
    return points


def _split(text: str, cast):
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()


# -- what the run ran on -------------------------------------------------------------------------
def _device_name(device: str) -> str:
    import platform

    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return _cpu_model() or platform.processor() or platform.machine()


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _nvidia_smi(fields: str) -> str | None:
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0] or None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def git_commit(project: Path) -> str | None:
    proc = subprocess.run(["git", "-C", str(project), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(project), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return proc.stdout.strip() + ("-dirty" if dirty else "")


def command_line(argv: list[str]) -> str:
    """The command that is running, as a user would type it (argv: the arguments after the program name)."""
    return " ".join(["flash-attn-kernel", *(shlex.quote(a) for a in argv)])


def environment(device: str) -> dict:
    """Card, clocks, driver and the versions every recorded figure depends on."""
    import kernels
    import torch

    cuda = device == "cuda"
    return {
        "device": _device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "kernels": kernels.__version__,
        "transformers": _version_of("transformers"),
        "driver": _nvidia_smi("driver_version") if cuda else None,
        "clocks": _nvidia_smi("clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem") if cuda else None,
        "clocks_fields": "sm, max sm, memory, max memory" if cuda else None,
        "power_limit": _nvidia_smi("power.limit") if cuda else None,
        "cpu_threads": torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def describe_run(device: str, kernel, settings: Settings, project: Path, command: str) -> dict:
    """The header of a results file: environment(), the command, and how figures were measured."""
    cuda = device == "cuda"
    how = "CUDA events" if cuda else "perf_counter"
    return {
        "kind": "attention",
        **environment(device),
        "command": command,
        "commands": [command],
        "git": git_commit(project),
        "kernel": getattr(kernel, "__name__", None),
        "memory_method": MEMORY_METHOD[device],
        "peer_sources": peer_sources(),
        "timing": (f"{how} around each call after {settings.warmup} warm-up call"
                   + (f" and {settings.warmup_seconds} s of warm-up calls" if settings.warmup_seconds else "")
                   + ", median of "
                   f"{settings.min_repeats}..{settings.repeats} calls (stopping once they took "
                   f"{settings.point_seconds} s)"
                   + ("; the implementations of a point interleaved, one call each per round" if settings.interleave
                      else "")),
        "complete": False,
        "records": [],
    }


def _version_of(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


def peer_sources() -> dict[str, str]:
    """What each peer name stands for, so a reader knows exactly which code ran."""
    eager = ("transformers.models.llama.modeling_llama.eager_attention_forward "
             f"(transformers {_version_of('transformers')})" if _transformers_eager() is not None
             else "matmul -> fp32 softmax -> matmul, transformers' eager_attention_forward re-stated "
                  "(transformers not importable)")
    return {
        "sdpa-flash": "torch.nn.functional.scaled_dot_product_attention under sdpa_kernel(SDPBackend.FLASH_ATTENTION)",
        "sdpa-cudnn": "... under sdpa_kernel(SDPBackend.CUDNN_ATTENTION)",
        "sdpa-efficient": "... under sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION)",
        "sdpa-math": "... under sdpa_kernel(SDPBackend.MATH)",
        "flex": "torch.compile(flex_attention, dynamic=False); causal through create_block_mask, full attention "
                "without a mask",
        "eager": eager + "; causal through an additive (1, 1, s, s) mask as transformers builds it",
        "decode": "ours: flash_attn_with_kvcache over a paged cache (shuffled pages, block_table); SDPA peers: the "
                  "same K/V as a contiguous (b, h_kv, s, d) cache, GQA packed as (b, h_kv, h_q/h_kv, d) queries",
    }


def _pin_mmap_threshold() -> None:
    """Make glibc return freed large buffers to the system, so resident-set peaks see every call's buffers."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 128 * 1024)
        libc.mallopt(m_trim_threshold, 128 * 1024)
    except OSError:
        pass


# -- results file ----------------------------------------------------------------------------------
class ResultsFile:
    """The run's JSON, rewritten atomically after every record, and its markdown table beside it."""

    def __init__(self, path: Path, header: dict, append: bool = False):
        self.path = path
        self.doc = header
        if append and path.is_file():
            old = json.loads(path.read_text())
            header["records"] = old.get("records", [])
            header["commands"] = [*old.get("commands", [old.get("command")]), *header["commands"]]
            header["command"] = old.get("command", header["command"])
            header["date"] = old.get("date", header["date"])
            header["skipped"] = old.get("skipped", [])
        self._write()

    def add(self, record: Record) -> None:
        self.doc["records"].append(asdict(record))
        self._write()

    def note_skipped(self, points: int | None, why: str) -> None:
        self.doc.setdefault("skipped", []).append({"points": points, "why": why, "command": self.doc["commands"][-1]})
        self._write()

    def finish(self) -> None:
        self.doc["complete"] = not self.doc.get("skipped")
        self._write()

    def _write(self) -> None:
        write_results(self.path, self.doc, markdown_table(self.doc))


def write_results(path: Path, doc: dict, markdown: str) -> None:
    """Writes a results JSON (atomically: a reader, or a kill, never sees half a file) and its markdown."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    path.with_suffix(".md").write_text(markdown)


# -- implementations -------------------------------------------------------------------------------
# A factory takes the inputs of a point and returns the call to time; set-up work (masks, compiled
# functions, packed layouts) happens in the factory, outside the timed region.
Factory = Callable[..., Callable[[], object]]


def implementations(kernel, device: str, op: str, label: str, peers: list[str] | None) -> dict[str, Factory]:
    """name -> factory for our kernel and each requested peer usable on `device` for `op`."""
    if op == "decode":
        available = CUDA_DECODE_PEERS if device == "cuda" else CPU_DECODE_PEERS
        impls: dict[str, Factory] = {label: _ours_decode(kernel)}
        for name in available:
            if peers is None or name in peers:
                impls[name] = _sdpa_decode(name)
        return impls
    available = CUDA_PEERS if device == "cuda" else CPU_PEERS
    impls = {label: _ours(kernel)}
    for name in available:
        if peers is None or name in peers:
            impls[name] = {"flex": _flex, "eager": _eager}.get(name) or _sdpa(name)
    return impls


def _ours(kernel) -> Factory:
    def make(q, k, v, causal):
        return lambda: kernel.flash_attn_func(q, k, v, causal=causal)
    return make


def _backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-math": SDPBackend.MATH}[name]


def _sdpa(name: str) -> Factory:
    def make(q, k, v, causal):
        from torch.nn.attention import sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        backend = _backend(name)

        # SDPA takes (batch, heads, seqlen, dim); transposes are views, as a model passes them.
        def call():
            with sdpa_kernel(backend):
                return sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)
        return call
    return make


_FLEX = None


def _compiled_flex():
    global _FLEX
    if _FLEX is None:
        import torch
        from torch.nn.attention.flex_attention import flex_attention

        # Every shape of the grid is its own static graph; the default limit (8) would silently
        # fall back to uncompiled flex_attention, which materializes the whole score matrix.
        for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 4096))
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def _flex(q, k, v, causal):
    from torch.nn.attention.flex_attention import create_block_mask

    flex = _compiled_flex()
    block_mask = None
    if causal:
        def causal_mask(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx
        block_mask = create_block_mask(causal_mask, None, None, q.shape[1], k.shape[1], device=q.device)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return lambda: flex(qt, kt, vt, block_mask=block_mask).transpose(1, 2)


def _transformers_eager():
    try:
        from transformers.models.llama.modeling_llama import eager_attention_forward
    except Exception:  # noqa: BLE001 - transformers absent or broken: use the re-stated math
        return None
    return eager_attention_forward


def _eager_restated(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager_attention_forward for equal q/kv heads, for environments without transformers."""
    import torch

    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _eager(q, k, v, causal):
    import types

    import torch

    forward = _transformers_eager() or _eager_restated
    module = types.SimpleNamespace(num_key_value_groups=q.shape[2] // k.shape[2], training=False)
    mask = None
    if causal:
        s_q, s_k = q.shape[1], k.shape[1]
        mask = torch.full((s_q, s_k), torch.finfo(q.dtype).min, device=q.device, dtype=q.dtype)
        mask = mask.triu(s_k - s_q + 1)[None, None]  # bottom-right aligned, as flash-attn's causal
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scale = q.shape[-1] ** -0.5
    return lambda: forward(module, qt, kt, vt, mask, scale)[0]


def _ours_decode(kernel) -> Factory:
    def make(q, cache):
        return lambda: kernel.flash_attn_with_kvcache(q, cache.k_pages, cache.v_pages, cache_seqlens=cache.seqlens,
                                                      block_table=cache.block_table, causal=True)
    return make


def _sdpa_decode(name: str) -> Factory:
    def make(q, cache):
        from torch.nn.attention import sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        backend = _backend(name)
        b, _, hq, d = q.shape
        hkv = cache.k.shape[1]
        # One query token per head: the group's query heads become rows against their kv head, the
        # layout a decode kernel with GQA packing reads K/V once for.
        packed = q.view(b, hkv, hq // hkv, d)

        def call():
            with sdpa_kernel(backend):
                return sdpa(packed, cache.k, cache.v)
        return call
    return make


@dataclass
class DecodeCache:
    """The same K/V twice: as pages behind a block table (ours) and contiguous (SDPA)."""

    k_pages: object
    v_pages: object
    block_table: object
    seqlens: object
    k: object
    v: object


def _decode_inputs(point: Point, device: str, dtype):
    import torch

    b, length, hkv, d, page = point.batch, point.seqlen_k, point.heads_kv, point.hdim, point.page_size
    pages_per_seq = length // page
    k = torch.randn(b, hkv, length, d, device=device, dtype=dtype)
    v = torch.randn(b, hkv, length, d, device=device, dtype=dtype)
    # Pages in a shuffled order, as an allocator hands them out after some churn.
    order = torch.randperm(b * pages_per_seq, device=device, dtype=torch.int32)
    block_table = order.view(b, pages_per_seq)

    def paged(x):
        pages = torch.empty(b * pages_per_seq, page, hkv, d, device=device, dtype=dtype)
        pages[order.long()] = x.transpose(1, 2).reshape(b * pages_per_seq, page, hkv, d)
        return pages
    seqlens = torch.full((b,), length, device=device, dtype=torch.int32)
    q = torch.randn(b, 1, point.heads_q, d, device=device, dtype=dtype)
    return q, DecodeCache(paged(k), paged(v), block_table, seqlens, k, v)


# -- measuring -------------------------------------------------------------------------------------
def flops(op: str, batch: int, seqlen_q: int, seqlen_k: int, heads: int, hdim: int, causal: bool) -> float:
    """DESIGN.md's count: forward 4*b*s_q*s_k*h*d (halved for causal), backward 2.5x forward."""
    fwd = 4.0 * batch * seqlen_q * seqlen_k * heads * hdim
    if causal and op != "decode":
        fwd /= 2.0
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwdbwd": 3.5 * fwd, "decode": fwd}[op]


def decode_bytes(point: Point, element_size: int) -> int:
    """Bytes a decode step must move: the K/V cache read once, plus the queries and outputs."""
    kv = 2 * point.batch * point.seqlen_k * point.heads_kv * point.hdim
    q_and_out = 2 * point.batch * point.heads_q * point.hdim
    return (kv + q_and_out) * element_size


class PeakMemory:
    """Peak memory an op adds on top of what exists when `start` is called (MEMORY_METHOD says how)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.base = 0

    def start(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
            except OSError:
                self.base = -1
                return
            self.base = _proc_status_kib("VmRSS") * 1024

    def stop(self) -> int | None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        if self.base < 0:
            return None
        return max(0, _proc_status_kib("VmHWM") * 1024 - self.base)


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def measure_point(impls: dict[str, Factory], point: Point, device: str, settings: Settings) -> Iterator[Record]:
    """The record of every implementation on `point`, each as soon as it is measured.

    With settings.interleave the implementations are prepared and warmed up together, then called
    in rounds of one timed call each (in an order that rotates by one each round) until every one
    has its calls, and their records come at the end of the point; otherwise each is measured in
    one go (measure()) before the next starts.
    """
    if not settings.interleave:
        for impl, factory in impls.items():
            yield measure(factory, impl, point, device, settings)
        return
    timed = [Timed(factory, impl, point, device, settings) for impl, factory in impls.items()]
    rounds = 0
    while any(t.running for t in timed):
        # each round starts one implementation later, so none always runs right after the same one
        first = rounds % len(timed)
        for t in timed[first:] + timed[:first]:
            if t.running:
                t.call()
        rounds += 1
    for t in timed:
        yield t.record


def measure(factory: Factory, impl: str, point: Point, device: str, settings: Settings) -> Record:
    """Time one implementation on one point; any failure is recorded, never raised."""
    timed = Timed(factory, impl, point, device, settings)
    while timed.running:
        timed.call()
    return timed.record


class Timed:
    """One implementation on one point while it is timed: inputs made and warm-up done on creation,
    then one timed call per call(); any failure goes into the record, never raised."""

    def __init__(self, factory: Factory, impl: str, point: Point, device: str, settings: Settings):
        import torch

        self.point, self.device, self.settings = point, device, settings
        self.dtype = getattr(torch, DTYPES[point.dtype])
        self.record = Record(impl, point.op, point.dtype, point.batch, point.seqlen_q, point.seqlen_k,
                             point.heads_q, point.heads_kv, point.hdim, point.causal, None, None, None, None,
                             page_size=point.page_size)
        self.times: list[float] = []
        self.peaks: list[int | None] = []
        self.step: Callable[[], None] | None = None
        try:
            self.step = _prepare(factory, point, device, self.dtype)
            for _ in range(settings.warmup):
                self.step()  # module load, compilation, autotuning, handle creation
            _warm_up(self.step, settings.warmup_seconds, device == "cuda")
        except Exception as err:  # noqa: BLE001 - a failing peer is a result, not a reason to stop the run
            self._fail(err)

    @property
    def running(self) -> bool:
        return self.step is not None

    def call(self) -> None:
        """One timed call (peak memory taken around it); the record is filled in after the last."""
        try:
            memory = PeakMemory(self.device)
            memory.start()
            self.times.append(_time_call(self.step, self.device == "cuda"))
            self.peaks.append(memory.stop())
        except Exception as err:  # noqa: BLE001
            self._fail(err)
            return
        s = self.settings
        enough = len(self.times) >= s.min_repeats
        if len(self.times) >= s.repeats or (enough and sum(self.times) * 1e-3 >= s.point_seconds):
            self._finish()

    def _finish(self) -> None:
        rec, point = self.record, self.point
        rec.ms = statistics.median(self.times)
        rec.repeats = len(self.times)
        rec.peak_mem_bytes = None if None in self.peaks else max(self.peaks)
        rec.tflops = flops(point.op, point.batch, point.seqlen_q, point.seqlen_k, point.heads_q, point.hdim,
                           point.causal) / (rec.ms * 1e-3) / 1e12
        if point.op == "decode":
            rec.gbps = decode_bytes(point, self.dtype.itemsize) / (rec.ms * 1e-3) / 1e9
        self._release()

    def _fail(self, err: Exception) -> None:
        text = str(err).strip()
        self.record.error = f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__
        self._release()

    def _release(self) -> None:
        self.step = None
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()  # an OOM or a big peer must not shrink the next one's memory


def _prepare(factory: Factory, point: Point, device: str, dtype) -> Callable[[], None]:
    """The call to time for `point`: inputs are created here, outside the timed region."""
    import torch

    if point.op == "decode":
        q, cache = _decode_inputs(point, device, dtype)
        call = factory(q, cache)

        def decode_step():
            with torch.no_grad():
                call()
        return decode_step
    # Fresh random inputs (never zeros: they hide unwritten outputs and can run faster); FP8 rounded
    # from bfloat16 (randn has no float8 kernel).
    shape = (point.batch, point.seqlen_q, point.heads_q, point.hdim)
    grad_needed = point.op != "fwd"
    if dtype.itemsize == 1:
        q, k, v = (torch.randn(*shape, device=device, dtype=torch.bfloat16).to(dtype) for _ in range(3))
    else:
        q, k, v = (torch.randn(*shape, device=device, dtype=dtype, requires_grad=grad_needed) for _ in range(3))
    call = factory(q, k, v, point.causal)
    if point.op == "fwd":
        def fwd_step():
            with torch.no_grad():
                call()
        return fwd_step
    if point.op == "bwd":
        out = call()
        grad = torch.randn_like(out)

        def bwd_step():
            torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
        return bwd_step
    grad = torch.randn(shape, device=device, dtype=dtype)

    def fwdbwd_step():
        torch.autograd.grad(call(), (q, k, v), grad)
    return fwdbwd_step


def _warm_up(step: Callable[[], None], seconds: float, cuda: bool) -> None:
    """Calls `step` until `seconds` have passed, so that the implementation timed first on a point
    (ours) does not pay in its timed calls for a card coming out of idle. With one warm-up call the
    bench recorded 276 TFLOP/s at fwd 2k, head dim 128, for a kernel that benchmarks/call_time.py,
    30 calls in, timed at 306; with 0.1 s of calls, 287 (cuda_kernel_notes.md v18)."""
    if seconds <= 0:
        return
    import torch

    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        step()
        if cuda:
            torch.cuda.synchronize()  # one call at a time: the deadline is the device's too


def _time_call(step: Callable[[], None], cuda: bool) -> float:
    """Milliseconds one call of `step` takes."""
    import torch

    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def _load_kernel(project: Path, device: str):
    """The built kernel for `device`, loaded through `kernels` as users load it."""
    import kernels

    build = project / "build"
    if not build.is_dir():
        raise PipelineError("no build/ directory to benchmark", fix="run `flash-attn-kernel build` first")
    return kernels.get_local_kernel(build, backend="cpu" if device == "cpu" else None)


# -- reports ---------------------------------------------------------------------------------------
def is_ours(impl: str) -> bool:
    return impl.startswith("flash-attn-kernel")


def _ordered_impls(records: list[dict]) -> list[str]:
    order: dict[str, int] = {}
    for name in (*CUDA_PEERS, *CPU_PEERS):
        order.setdefault(name, len(order))
    return sorted({r["impl"] for r in records}, key=lambda n: (not is_ours(n), order.get(n, 99), n))


def header_line(doc: dict) -> str:
    """Card, clocks and versions, in one line."""
    parts = [str(doc.get("device"))]
    if doc.get("clocks"):
        parts.append(f"clocks {doc['clocks']} ({doc.get('clocks_fields', 'sm, max sm, memory')})")
    if doc.get("driver"):
        parts.append(f"driver {doc['driver']}")
    parts.append(f"torch {doc.get('torch')}")
    if doc.get("cuda"):
        parts.append(f"CUDA {doc['cuda']}")
    if doc.get("cudnn"):
        parts.append(f"cuDNN {doc['cudnn']}")
    if doc.get("kernels"):
        parts.append(f"kernels {doc['kernels']}")
    if doc.get("transformers"):
        parts.append(f"transformers {doc['transformers']}")
    parts.append(str(doc.get("date")))
    if doc.get("git"):
        parts.append(f"git {doc['git']}")
    return " · ".join(parts)


def _mib(value) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    mib = value / 2**20
    return f"{mib:.0f}" if mib >= 10 else f"{mib:.2g}"


def _num(value: float) -> str:
    """Three significant figures without exponent noise: 612, 45.3, 0.0312."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def markdown_table(doc: dict) -> str:
    """Markdown tables of a results document: TFLOP/s and peak memory per point, our ratio to the best peer."""
    records = doc.get("records", [])
    lines = [header_line(doc), ""]
    for cmd in doc.get("commands") or [doc.get("command")]:
        lines.append(f"    {cmd}")
    lines.append("")
    if not doc.get("complete", True):
        why = "; ".join(s["why"] for s in doc.get("skipped", [])) or "still running or stopped"
        lines += [f"**Incomplete run** ({why}).", ""]
    sections = sorted({(r["op"], r["dtype"]) for r in records if r["op"] != "decode"},
                      key=lambda k: (OPS.index(k[0]) if k[0] in OPS else 9, k[1]))
    for op, dtype in sections:
        rows = [r for r in records if r["op"] == op and r["dtype"] == dtype]
        lines += [f"### {op} {dtype}: TFLOP/s (peak MiB)", ""]
        lines += _pivot(rows)
        lines.append("")
    decode = [r for r in records if r["op"] == "decode"]
    if decode:
        lines += ["### decode (seqlen_q 1, paged KV for ours, contiguous for SDPA)", "",
                  "| dtype | batch | cache | heads q:kv | hdim | page | impl | µs | GB/s | TFLOP/s | peak MiB |",
                  "|---|---|---|---|---|---|---|---:|---:|---:|---:|"]
        for r in decode:
            us = f"{r['ms'] * 1e3:.1f}" if r.get("ms") else "—"
            gbps = f"{r['gbps']:.0f}" if r.get("gbps") else "—"
            tf = _num(r["tflops"]) if r.get("tflops") else "—"
            lines.append(f"| {r['dtype']} | {r['batch']} | {r['seqlen_k']} | {r['heads_q']}:{r['heads_kv']} | "
                         f"{r['hdim']} | {r.get('page_size') or '—'} | {r['impl']} | {us} | {gbps} | {tf} | "
                         f"{_mib(r.get('peak_mem_bytes'))} |")
        lines.append("")
    errors = {}
    for r in records:
        if r.get("error"):
            errors.setdefault((r["impl"], r["error"]), []).append(f"{r['op']} {r['dtype']} d{r['hdim']} s{r['seqlen_q']}"
                                                                  f"{' causal' if r['causal'] else ''}")
    if errors:
        lines += ["### Skipped (error recorded)", ""]
        for (impl, err), where in sorted(errors.items()):
            shown = ", ".join(where[:6]) + (f" and {len(where) - 6} more" if len(where) > 6 else "")
            lines.append(f"- **{impl}** at {shown}: `{err}`")
        lines.append("")
    return "\n".join(lines)


def _pivot(rows: list[dict]) -> list[str]:
    impls = _ordered_impls(rows)
    ours = [n for n in impls if is_ours(n)]
    by_point: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_point.setdefault((r["hdim"], r["seqlen_q"], r["causal"], r["batch"], r["heads_q"]), {})[r["impl"]] = r
    out = ["| hdim | seqlen | causal | batch×heads | " + " | ".join(impls) + " | ours / best peer |",
           "|---|---|---|---|" + "---:|" * (len(impls) + 1)]
    for (hdim, seqlen, causal, batch, heads), vals in sorted(by_point.items()):
        cells = []
        for n in impls:
            r = vals.get(n)
            cells.append(f"{_num(r['tflops'])} ({_mib(r.get('peak_mem_bytes'))})" if r and r.get("tflops") else "—")
        ratio = "—"
        if ours and vals.get(ours[0], {}).get("tflops"):
            peers = [r["tflops"] for n, r in vals.items() if not is_ours(n) and r.get("tflops")]
            if peers:
                ratio = f"{vals[ours[0]]['tflops'] / max(peers):.2f}x"
        out.append(f"| {hdim} | {seqlen} | {causal} | {batch}×{heads} | " + " | ".join(cells) + f" | {ratio} |")
    return out


def plot_paths(json_path: Path, doc: dict) -> dict[str, Path]:
    """Where each plot of a results file goes: beside the JSON, named by the JSON's stem."""
    stem = json_path.with_suffix("")
    paths = {}
    for op, dtype in sorted({(r["op"], r["dtype"]) for r in doc.get("records", []) if r["op"] != "decode"}):
        paths[f"tflops-{op}-{dtype}"] = stem.with_name(f"{stem.name}-tflops-{op}-{dtype}.png")
        paths[f"memory-{op}-{dtype}"] = stem.with_name(f"{stem.name}-memory-{op}-{dtype}.png")
    if any(r["op"] == "decode" for r in doc.get("records", [])):
        paths["decode"] = stem.with_name(f"{stem.name}-decode.png")
    return paths


def write_outputs(doc: dict, json_path: Path) -> list[Path]:
    """The markdown table and the PNG plots of a results file (plots only where matplotlib is installed)."""
    md = json_path.with_suffix(".md")
    md.write_text(markdown_table(doc))
    written = [md]
    try:
        written += write_plots(doc, json_path)
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e '.[bench]')", file=sys.stderr)
    return written


def write_plots(doc: dict, json_path: Path) -> list[Path]:
    """One figure per (op, dtype) for TFLOP/s and one for peak memory, against seqlen; one for decode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in doc.get("records", []) if r.get("ms") is not None]
    paths = plot_paths(json_path, doc)
    impls = _ordered_impls(doc.get("records", []))
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(impls)}
    title = f"{doc.get('device')} · torch {doc.get('torch')} · {str(doc.get('date'))[:10]}"
    written = []
    for key, path in paths.items():
        if key == "decode":
            rows = [r for r in records if r["op"] == "decode"]
            if not rows:
                continue
            fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 + 0.45 * len(rows)), squeeze=False)
            labels = [f"{r['impl']} {r['dtype']}" for r in rows]
            for ax, metric, unit in ((axes[0][0], lambda r: r["ms"] * 1e3, "µs (lower is better)"),
                                     (axes[0][1], lambda r: r["gbps"], "GB/s of K/V read (higher is better)")):
                ax.barh(labels, [metric(r) for r in rows], color=[colors[r["impl"]] for r in rows])
                ax.set_xlabel(unit)
                ax.invert_yaxis()
            axes[0][1].set_yticks([])
            r0 = rows[0]
            fig.suptitle(f"decode b{r0['batch']} cache {r0['seqlen_k']} h{r0['heads_q']}:{r0['heads_kv']} "
                         f"d{r0['hdim']} page {r0.get('page_size')}\n{title}", fontsize=9)
        else:
            metric, op, dtype = key.split("-", 2)
            rows = [r for r in records if r["op"] == op and r["dtype"] == dtype]
            if not rows:
                continue
            hdims = sorted({r["hdim"] for r in rows})
            causals = sorted({r["causal"] for r in rows})
            fig, axes = plt.subplots(len(causals), len(hdims), figsize=(4.2 * len(hdims), 3.4 * len(causals)),
                                     squeeze=False, sharex=True)
            for i, causal in enumerate(causals):
                for j, hdim in enumerate(hdims):
                    ax = axes[i][j]
                    positive = True
                    for impl in impls:
                        pts = sorted((r["seqlen_q"], r["tflops"] if metric == "tflops" else r.get("peak_mem_bytes"))
                                     for r in rows if r["impl"] == impl and r["hdim"] == hdim and r["causal"] == causal)
                        pts = [(s, y if metric == "tflops" else y / 2**20) for s, y in pts if y is not None]
                        positive = positive and all(y > 0 for _, y in pts)
                        if pts:
                            ax.plot(*zip(*pts), marker="o", label=impl, color=colors[impl],
                                    linewidth=2.5 if is_ours(impl) else 1.2)
                    ax.set_xscale("log", base=2)
                    seqlens = sorted({r["seqlen_q"] for r in rows})
                    ax.set_xticks(seqlens, [f"{s // 1024}k" if s >= 1024 else str(s) for s in seqlens])
                    ax.minorticks_off()
                    if metric == "memory" and positive:
                        ax.set_yscale("log")
                    ax.set_title(f"hdim {hdim}{' causal' if causal else ''}", fontsize=9)
                    ax.grid(True, alpha=0.3)
                    if i == len(causals) - 1:
                        ax.set_xlabel("seqlen (batch·seqlen fixed)")
                    if j == 0:
                        ax.set_ylabel("TFLOP/s" if metric == "tflops" else "peak MiB")
            handles, labels = axes[0][0].get_legend_handles_labels()
            for row in axes:
                for ax in row:
                    for h, lab in zip(*ax.get_legend_handles_labels()):
                        if lab not in labels:
                            handles.append(h)
                            labels.append(lab)
            fig.legend(handles, labels, loc="lower center", ncol=max(1, min(len(labels), 3 * len(hdims))), fontsize=8)
            what = "TFLOP/s" if metric == "tflops" else "peak memory over the inputs"
            fig.suptitle(f"{op} {dtype}: {what}\n{title}", fontsize=10)
            legend_rows = math.ceil(len(labels) / max(1, min(len(labels), 3 * len(hdims))))
            fig.tight_layout(rect=(0, 0.04 + 0.05 * legend_rows / len(causals), 1, 1))
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
