"""Training-loop speed: tokens/s and peak memory of a small Llama-like transformers model per attention.

The model is built from a config (random weights, bf16, AdamW), trained for a few steps at each
sequence length with every attention implementation: this project's kernel through transformers'
hub-kernel loading (`attn_implementation="<org>/flash-attn"`, the build published to an embedded
repository and reached through LOCAL_KERNELS, exactly as a user's from_pretrained does), "sdpa"
and "eager"; each with and without Liger kernels where liger_kernel imports (CUDA only).

Each (implementation, Liger) pair runs in its own process: Liger patches transformers' modules
for the whole process, and an out-of-memory must not disturb the next pair.

    python benchmarks/train_loop.py [--seqlens 2048,4096,8192,16384] [--impls ours,sdpa,eager] [--liger both]

Writes benchmarks/results/<name>.json (after every measurement), <name>.md and <name>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flash_attn_kernel import bench  # noqa: E402

OURS = "ours"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--project", default=str(REPO), help="kernel project whose build/ is trained with (default: this one)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when present")
    p.add_argument("--name", default=None, help="results name under benchmarks/results/ (default: derived)")
    p.add_argument("--impls", default=f"{OURS},sdpa,eager", help=f"attention implementations (default: {OURS},sdpa,eager)")
    p.add_argument("--liger", choices=("auto", "both", "on", "off"), default="auto",
                   help="with/without Liger kernels (auto: both where liger_kernel imports on CUDA, else off)")
    p.add_argument("--seqlens", default=None, help="comma-separated (default: 2048,4096,8192,16384 on CUDA, 128,256 on CPU)")
    p.add_argument("--tokens-per-step", type=int, default=None,
                   help="batch * seqlen per optimizer step (default: 16384 on CUDA, 512 on CPU)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per point (default: 3)")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed steps first (default: 1)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: 4 on CUDA, 2 on CPU)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default: 2048 on CUDA, 128 on CPU)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: 16 on CUDA, 4 on CPU)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: = --heads)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (default: 2.75 x hidden)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (default: 32000 on CUDA, 512 on CPU)")
    p.add_argument("--time-budget", type=float, default=None, help="start no new (implementation, Liger) run after this")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def model_shape(args: argparse.Namespace, cuda: bool) -> dict:
    hidden = args.hidden or (2048 if cuda else 128)
    heads = args.heads or (16 if cuda else 4)
    return {"layers": args.layers or (4 if cuda else 2), "hidden": hidden, "heads": heads,
            "kv_heads": args.kv_heads or heads, "intermediate": args.intermediate or int(2.75 * hidden) // 64 * 64,
            "vocab": args.vocab or (32000 if cuda else 512)}


# -- the worker: one (implementation, Liger) pair, every sequence length ---------------------------
def worker(spec: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cuda = spec["device"] == "cuda"
    shape = spec["shape"]
    if spec["liger"]:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()  # RoPE, RMSNorm, SwiGLU, fused linear cross-entropy
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                         num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv_heads"], max_position_embeddings=max(spec["seqlens"]),
                         tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=spec["attn_implementation"],
                                             dtype=torch.bfloat16).to(spec["device"])
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    params = sum(p.numel() for p in model.parameters())
    memory = bench.PeakMemory(spec["device"])
    for seqlen in spec["seqlens"]:
        batch = max(1, spec["tokens_per_step"] // seqlen)
        rec = {"seqlen": seqlen, "batch": batch, "params": params, "tokens_per_s": None, "step_ms": None,
               "peak_mem_bytes": None, "losses": [], "error": None}
        try:
            ids = torch.randint(0, shape["vocab"], (batch, seqlen), device=spec["device"])
            times = []
            memory.start()
            for step in range(spec["warmup_steps"] + spec["steps"]):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.synchronize()
                if step >= spec["warmup_steps"]:
                    times.append(time.perf_counter() - t0)
                rec["losses"].append(round(float(loss), 4))
            peak = memory.stop()
            # Peak memory of the whole step: weights, gradients, optimizer state and activations.
            rec["peak_mem_bytes"] = (peak + memory.base) if peak is not None else None
            rec["step_ms"] = 1e3 * sum(times) / len(times)
            rec["tokens_per_s"] = batch * seqlen * len(times) / sum(times)
        except Exception as err:  # noqa: BLE001 - an OOM at one length is a result; the next length still runs
            text = str(err).strip()
            rec["error"] = f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__
            optimizer.zero_grad(set_to_none=True)
        finally:
            loss = None
            if cuda:
                torch.cuda.empty_cache()
        print("RECORD " + json.dumps(rec), flush=True)


# -- the parent: publish, run the workers, record --------------------------------------------------
def publish_for_transformers(project: Path, device: str, hub_dir: Path) -> tuple[str, str]:
    """Publishes the built variant for `device` to an embedded repository; returns (repo id, LOCAL_KERNELS)."""
    from flash_attn_kernel import plan
    from flash_attn_kernel.publish import publish_local

    wanted = [str(v) for v in plan.host_variants(project) if (v.backend == "cpu") == (device == "cpu")]
    built = [n for n in wanted if (project / "build" / n / "metadata.json").is_file()]
    if not built:
        raise SystemExit(f"no build/<variant> for {device} under {project}/build: run `flash-attn-kernel build` first")
    result = publish_local(project, hub_dir=hub_dir, variants=built)
    return result.repo_id, f"{result.repo_id}={result.load_path}"


def liger_choices(mode: str, cuda: bool) -> list[bool]:
    if mode == "on":
        return [True]
    if mode == "off":
        return [False]
    if mode == "both":
        return [False, True]
    import importlib.util

    # Liger's kernels are Triton kernels: only on CUDA, and only where the package is installed.
    return [False, True] if cuda and importlib.util.find_spec("liger_kernel") is not None else [False]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    import torch

    project = Path(args.project).resolve()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    seqlens = bench._split(args.seqlens, int) if args.seqlens else ([2048, 4096, 8192, 16384] if cuda else [128, 256])
    impls = bench._split(args.impls, str)
    shape = model_shape(args, cuda)
    if not cuda:
        bench._pin_mmap_threshold()
    env = bench.environment(device)
    name = args.name or f"train-loop-{device}-{bench._slug(env['device'])}-{env['date'][:10]}"
    out = REPO / "benchmarks" / "results" / f"{name}.json"
    doc = {"kind": "train-loop", **env, "command": " ".join(["python", "benchmarks/train_loop.py", *sys.argv[1:]]),
           "git": bench.git_commit(project), "model": {"architecture": "LlamaForCausalLM (from config, random weights)",
                                                      "dtype": "bfloat16", "optimizer": "AdamW (foreach)", **shape},
           "steps": args.steps, "warmup_steps": args.warmup_steps,
           "tokens_per_step": args.tokens_per_step or (16384 if cuda else 512),
           "memory_method": ("torch.cuda.max_memory_allocated() over the steps of one length (absolute: weights, "
                             "gradients, optimizer state, activations)" if cuda else
                             "peak resident set size (VmHWM, reset per length) of the worker process"),
           "complete": False, "records": []}

    # `timeout` sends SIGTERM: stop like Ctrl-C so that the table and the plot still get written.
    signal.signal(signal.SIGTERM, bench._raise_interrupt)
    try:
        _run_all(args, project, device, seqlens, impls, shape, doc, out)
    except KeyboardInterrupt:
        doc.setdefault("skipped", []).append("interrupted")
        print("interrupted: writing what was measured", flush=True)
    doc["complete"] = not doc.get("skipped")
    _write(doc, out)
    written = [out, out.with_suffix(".md")]
    try:
        written.append(write_plot(doc, out.with_suffix(".png")))
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    print(markdown(doc))
    print("wrote " + ", ".join(str(p.relative_to(REPO)) for p in written))
    return 0


def _run_all(args, project: Path, device: str, seqlens: list[int], impls: list[str], shape: dict, doc: dict,
             out: Path) -> None:
    """One worker process per (implementation, Liger) pair, each over every sequence length."""
    cuda = device == "cuda"
    with tempfile.TemporaryDirectory(prefix="train-loop-hub-") as hub_dir:
        local_kernels = None
        if OURS in impls:
            repo_id, local_kernels = publish_for_transformers(project, device, Path(hub_dir))
            doc["kernel_repo"] = repo_id
        started = time.monotonic()
        runs = [(impl, liger) for liger in liger_choices(args.liger, cuda) for impl in impls]
        for i, (impl, liger) in enumerate(runs, 1):
            if args.time_budget is not None and time.monotonic() - started > args.time_budget:
                doc.setdefault("skipped", []).append(f"{len(runs) - i + 1} runs: time budget spent")
                break
            attn = doc.get("kernel_repo") if impl == OURS else impl
            label = ("flash-attn-kernel" if impl == OURS else impl) + (" + liger" if liger else "")
            print(f"[{i}/{len(runs)}] {label}: attn_implementation={attn!r}, seqlens {seqlens}", flush=True)
            spec = {"device": device, "shape": shape, "liger": liger, "attn_implementation": attn, "seqlens": seqlens,
                    "tokens_per_step": doc["tokens_per_step"], "steps": args.steps, "warmup_steps": args.warmup_steps}
            worker_env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
            if local_kernels:
                worker_env["LOCAL_KERNELS"] = local_kernels
            proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], env=worker_env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                seen, tail = _collect(proc, label, attn, liger, i, len(runs), doc, out)
            except KeyboardInterrupt:
                proc.kill()
                proc.wait()
                raise
            if proc.returncode != 0 or seen < len(seqlens):
                why = "\n".join(tail[-5:])
                for seqlen in seqlens[seen:]:
                    doc["records"].append({"impl": label, "attn_implementation": attn, "liger": liger, "seqlen": seqlen,
                                           "batch": max(1, doc["tokens_per_step"] // seqlen), "tokens_per_s": None,
                                           "step_ms": None, "peak_mem_bytes": None,
                                           "error": f"worker exited {proc.returncode}: {why[-300:]}"})
                print(f"    worker for {label} exited {proc.returncode}:\n{why}", flush=True)
                _write(doc, out)


def _collect(proc, label: str, attn: str, liger: bool, i: int, n: int, doc: dict, out: Path) -> tuple[int, list[str]]:
    """Records from a worker's output as they arrive; returns how many came and the output's last lines."""
    seen = 0
    tail: list[str] = []
    for line in proc.stdout:
        if line.startswith("RECORD "):
            rec = {"impl": label, "attn_implementation": attn, "liger": liger, **json.loads(line[7:])}
            doc["records"].append(rec)
            seen += 1
            _write(doc, out)
            shown = (f"{rec['tokens_per_s']:10.0f} tokens/s  {rec['step_ms']:9.1f} ms/step  peak "
                     f"{rec['peak_mem_bytes'] / 2**30:6.2f} GiB" if rec["tokens_per_s"] else rec["error"])
            print(f"    [{i}/{n}] {label} seqlen {rec['seqlen']:6d} batch {rec['batch']:3d}: {shown}", flush=True)
        else:
            tail = (tail + [line.rstrip()])[-20:]
    proc.wait()
    return seen, tail


def _write(doc: dict, out: Path) -> None:
    bench.write_results(out, doc, markdown(doc))


def markdown(doc: dict) -> str:
    """Tokens/s and peak memory per implementation and sequence length, with the ratio to sdpa."""
    m = doc["model"]
    lines = [bench.header_line(doc), "",
             f"{m['architecture']}: {m['layers']} layers, hidden {m['hidden']}, {m['heads']} heads "
             f"({m['kv_heads']} kv), MLP {m['intermediate']}, vocab {m['vocab']}, {m['dtype']}, {m['optimizer']}; "
             f"{doc['tokens_per_step']} tokens per step, {doc['steps']} timed steps after {doc['warmup_steps']} warm-up.",
             "", f"    {doc['command']}", ""]
    records = doc.get("records", [])
    if not records:
        return "\n".join(lines + ["No measurements yet.", ""])
    impls = list(dict.fromkeys(r["impl"] for r in records))
    seqlens = sorted({r["seqlen"] for r in records})
    by = {(r["impl"], r["seqlen"]): r for r in records}
    lines += ["| seqlen | batch | " + " | ".join(f"{i} tokens/s (peak GiB)" for i in impls) + " | flash-attn-kernel / sdpa |",
              "|---|---|" + "---:|" * (len(impls) + 1)]
    for s in seqlens:
        cells = []
        for impl in impls:
            r = by.get((impl, s))
            cells.append(f"{r['tokens_per_s']:.0f} ({r['peak_mem_bytes'] / 2**30:.1f})" if r and r.get("tokens_per_s")
                         else ("OOM" if r and r.get("error") and "OutOfMemory" in r["error"] else "—"))
        ratios = []
        for suffix in ("", " + liger"):
            ours, sdpa = by.get(("flash-attn-kernel" + suffix, s)), by.get(("sdpa" + suffix, s))
            if ours and sdpa and ours.get("tokens_per_s") and sdpa.get("tokens_per_s"):
                ratios.append(f"{ours['tokens_per_s'] / sdpa['tokens_per_s']:.2f}x{suffix}")
        batch = next((r["batch"] for r in records if r["seqlen"] == s), "")
        lines.append(f"| {s} | {batch} | " + " | ".join(cells) + f" | {', '.join(ratios) or '—'} |")
    errors = sorted({(r["impl"], r["seqlen"], r["error"]) for r in records if r.get("error")})
    if errors:
        lines += ["", "Failures:"] + [f"- {impl} at seqlen {s}: `{err[:200]}`" for impl, s, err in errors]
    return "\n".join(lines) + "\n"


def write_plot(doc: dict, path: Path) -> Path:
    """Tokens/s and peak memory against sequence length, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in doc.get("records", []) if r.get("tokens_per_s")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for impl in dict.fromkeys(r["impl"] for r in doc.get("records", [])):
        pts = sorted((r["seqlen"], r["tokens_per_s"], r["peak_mem_bytes"] / 2**30) for r in records if r["impl"] == impl)
        if not pts:
            continue
        style = {"linewidth": 2.5 if impl.startswith("flash-attn-kernel") else 1.2, "marker": "o",
                 "linestyle": "--" if "liger" in impl else "-"}
        left.plot([p[0] for p in pts], [p[1] for p in pts], label=impl, **style)
        right.plot([p[0] for p in pts], [p[2] for p in pts], label=impl, **style)
    for ax, ylabel in ((left, "tokens/s (higher is better)"), (right, "peak memory, GiB (lower is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    m = doc["model"]
    fig.suptitle(f"training loop: Llama-like {m['layers']}x{m['hidden']}, {doc['tokens_per_step']} tokens/step, bf16\n"
                 f"{doc['device']} · torch {doc['torch']} · {doc['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
