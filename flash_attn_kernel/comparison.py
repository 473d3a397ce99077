"""docs/attention-comparison.md, generated from the recorded results (never edited by hand).

It fills the two sections TRL's "Kernels Hub Integration and Usage" guide leaves TODO: comparing
attention implementations (throughput, latency, memory) and a build from source against the Hub
kernel (time to a working kernel, throughput, training-loop speed-ups, memory savings). Each
section takes the newest results file of its kind under benchmarks/results/ and says "not
measured yet" when there is none.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from . import bench

PAGE = Path("docs") / "attention-comparison.md"
RESULTS = Path("benchmarks") / "results"
HEADLINE_SEQLENS = (2048, 8192, 16384)
BENCH_SCRIPT = "bash ci/gpu-bench.sh"
TRAIN_SCRIPT = "bash ci/gpu-train.sh"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default=str(PAGE), help=f"page to write, relative to --project (default: {PAGE})")


def run(args: argparse.Namespace) -> int:
    project = Path(args.project).resolve()
    out = project / args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(project, out.parent))
    print(f"wrote {out.relative_to(project)}")
    return 0


# -- finding results -------------------------------------------------------------------------------
def kind_of(doc: dict) -> str | None:
    """The kind of a results document; attention runs written before `kind` existed are recognised by their records."""
    if doc.get("kind"):
        return doc["kind"]
    records = doc.get("records")
    if isinstance(records, list) and records and isinstance(records[0], dict) and "op" in records[0]:
        return "attention"
    return None


def newest(results: Path, kind: str, op: str | None = None) -> tuple[Path, dict] | None:
    """The newest results file of `kind` (with `op`: holding a record of that op); for attention runs,
    a GPU run wins over a CPU run."""
    found = []
    for path in sorted(results.glob("*.json")) if results.is_dir() else []:
        try:
            doc = json.loads(path.read_text())
        except ValueError:
            continue
        if not (isinstance(doc, dict) and kind_of(doc) == kind and (doc.get("records") or doc.get("summary"))):
            continue
        if op is None or any(isinstance(r, dict) and r.get("op") == op for r in doc.get("records", [])):
            found.append((bool(doc.get("cuda")) if kind == "attention" else True, str(doc.get("date", "")), path, doc))
    if not found:
        return None
    _, _, path, doc = max(found, key=lambda f: (f[0], f[1]))
    return path, doc


# -- the headline: what a card or a page shows first -----------------------------------------------
def headline_records(doc: dict) -> list[dict]:
    """bf16 (or the first dtype), the most measured head dim, fwd and bwd at a few lengths, causal and not."""
    records = [r for r in doc.get("records", []) if r.get("op") in ("fwd", "bwd")]
    if not records:
        return []
    dtypes = [r["dtype"] for r in records]
    dtype = "bf16" if "bf16" in dtypes else dtypes[0]
    records = [r for r in records if r["dtype"] == dtype]
    hdims = [r["hdim"] for r in records]
    hdim = 128 if 128 in hdims else max(set(hdims), key=hdims.count)
    records = [r for r in records if r["hdim"] == hdim]
    seqlens = sorted({r["seqlen_q"] for r in records})
    wanted = [s for s in seqlens if s in HEADLINE_SEQLENS] or seqlens[-3:]
    return [r for r in records if r["seqlen_q"] in wanted]


def headline_table(doc: dict) -> str:
    """TFLOP/s of every implementation at the headline points, and ours over the best peer."""
    rows = headline_records(doc)
    if not rows:
        return ""
    impls = bench._ordered_impls(rows)
    ours = [n for n in impls if bench.is_ours(n)]
    points: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        points.setdefault((r["op"], r["causal"], r["seqlen_q"]), {})[r["impl"]] = r
    first = rows[0]
    lines = [f"TFLOP/s, {first['dtype']}, head dim {first['hdim']}, {first['heads_q']} heads, batch·seqlen "
             f"{first['batch'] * first['seqlen_q']} (higher is better):", "",
             "| op | causal | seqlen | " + " | ".join(impls) + " | ours / best peer |",
             "|---|---|---|" + "---:|" * (len(impls) + 1)]
    for (op, causal, seqlen), vals in sorted(points.items(), key=lambda kv: (kv[0][0] != "fwd", kv[0][1], kv[0][2])):
        cells = [bench._num(vals[n]["tflops"]) if vals.get(n, {}).get("tflops") else "—" for n in impls]
        peers = [r["tflops"] for n, r in vals.items() if not bench.is_ours(n) and r.get("tflops")]
        mine = vals.get(ours[0], {}).get("tflops") if ours else None
        ratio = f"{mine / max(peers):.2f}x" if mine and peers else "—"
        lines.append(f"| {op} | {'yes' if causal else 'no'} | {seqlen} | " + " | ".join(cells) + f" | {ratio} |")
    decode = [r for r in doc.get("records", []) if r.get("op") == "decode" and r["dtype"] == first["dtype"]]
    if decode:
        d = decode[0]
        lines += ["", f"Decode, {d['dtype']}, batch {d['batch']}, cache {d['seqlen_k']}, heads {d['heads_q']}:"
                      f"{d['heads_kv']}, head dim {d['hdim']} (ours paged, page {d.get('page_size')}; SDPA contiguous):",
                  "", "| implementation | µs | GB/s of K/V |", "|---|---:|---:|"]
        for r in decode:
            lines.append(f"| {r['impl']} | {r['ms'] * 1e3:.0f} | {r['gbps']:.0f} |" if r.get("ms") else
                         f"| {r['impl']} | — | — |")
    return "\n".join(lines)


def ratios_to_peers(doc: dict, min_seqlen: int = 2048) -> list[tuple[str, str, str, float, float, float, int]]:
    """(op, dtype, peer, median, min, max, points) of ours / peer over the points with seqlen >= min_seqlen."""
    by_point: dict[tuple, dict[str, float]] = {}
    for r in doc.get("records", []):
        if r.get("tflops") and r["op"] != "decode" and r["seqlen_q"] >= min_seqlen:
            key = (r["op"], r["dtype"], r["hdim"], r["seqlen_q"], r["causal"])
            by_point.setdefault(key, {})[r["impl"]] = r["tflops"]
    ratios: dict[tuple[str, str, str], list[float]] = {}
    for (op, dtype, *_), vals in by_point.items():
        ours = [v for n, v in vals.items() if bench.is_ours(n)]
        if not ours:
            continue
        for peer, v in vals.items():
            if not bench.is_ours(peer):
                ratios.setdefault((op, dtype, peer), []).append(ours[0] / v)
    order = {name: i for i, name in enumerate(bench._ordered_impls([{"impl": p} for _, _, p in ratios]))}
    return [(op, dt, peer, statistics.median(v), min(v), max(v), len(v))
            for (op, dt, peer), v in sorted(ratios.items(), key=lambda kv: (bench.OPS.index(kv[0][0]), kv[0][1],
                                                                            order[kv[0][2]]))]


# -- the page --------------------------------------------------------------------------------------
def _rel(path: Path, page_dir: Path) -> str:
    import os

    return Path(os.path.relpath(path, page_dir)).as_posix()


def _source_line(doc: dict, path: Path, project: Path) -> str:
    return (f"Measured on **{doc.get('device')}** — " + bench.header_line(doc).split(" · ", 1)[-1] +
            f". Results file: `{path.relative_to(project).as_posix()}`.")


def render(project: Path, page_dir: Path) -> str:
    """The whole page from whatever results exist under `project`/benchmarks/results."""
    results = project / RESULTS
    attention = newest(results, "attention")
    decode = newest(results, "attention", op="decode")  # a run without decode points keeps the last one's
    train = newest(results, "train-loop")
    build = newest(results, "build-vs-hub")
    parts = [
        "# Attention implementations compared, and the Hub kernel against a build from source",
        "",
        "<!-- Generated by `flash-attn-kernel docs` from benchmarks/results/*.json. Do not edit: rerun the "
        "benchmarks and the generator. -->",
        "",
        "This page answers two questions a practitioner asks before picking `attn_implementation`: which attention "
        "is fastest and leanest on my GPU for my shapes, and what do I gain by loading a prebuilt kernel from the "
        "Hub instead of compiling one. Every number below comes from a results file written by a benchmark command "
        "(named under each table), with the card, clocks and versions it ran on.",
        "",
        "Names used below: `flash-attn-kernel[...]` is this kernel (`kernels.get_kernel(\"<org>/flash-attn\")`, or "
        "`attn_implementation=\"<org>/flash-attn\"` in transformers); `sdpa-flash`, `sdpa-cudnn`, `sdpa-efficient`, "
        "`sdpa-math` are PyTorch's `scaled_dot_product_attention` pinned to one backend (transformers' "
        "`\"sdpa\"` lets PyTorch choose among them); `flex` is compiled FlexAttention; `eager` is transformers' "
        "`\"eager\"` attention (matmul, softmax, matmul).",
        "",
        "## Comparing attention implementations",
        "",
    ]
    parts += _attention_section(attention, decode, project, page_dir)
    parts += ["", "## Benchmarking a build from source against the Hub kernel", ""]
    parts += _build_section(build, project)
    parts += ["", "### Speed-ups in a training loop, and memory savings", ""]
    parts += _train_section(train, project, page_dir)
    parts += ["", "## Reproducing", "",
              "On a GPU machine with this repository (`bash ci/setup.sh` once, or the device scripts, which use the "
              "machine's own torch):", "",
              "```bash",
              f"{BENCH_SCRIPT}    # build, attention grid (throughput, latency, memory), decode",
              f"{TRAIN_SCRIPT}    # build from source vs Hub kernel, training loop",
              "flash-attn-kernel docs      # this page, from benchmarks/results/*.json",
              "```", "",
              "Each results file records the exact command that wrote it (quoted under each table above); running "
              "that command alone reproduces that file. `flash-attn-kernel bench --render FILE.json` redraws a "
              "file's tables and plots.", ""]
    return "\n".join(parts)


def _attention_section(found, decode_found, project: Path, page_dir: Path) -> list[str]:
    if not found:
        return ["_Not measured yet_: no attention results file (`flash-attn-kernel bench`) under "
                "`benchmarks/results/`."]
    path, doc = found
    # Decode from the newest run on the same kind of device (a CPU run's decode is no GPU figure).
    same_device = decode_found and bool(decode_found[1].get("cuda")) == bool(doc.get("cuda"))
    decode_path, decode_doc = decode_found if same_device else found
    out = [_source_line(doc, path, project), ""]
    cmds = doc.get("commands") or [doc.get("command")]
    out += ["Produced by:", "", "```bash", *cmds, "```", ""]
    if not doc.get("complete", True):
        why = "; ".join(str(s.get("why")) for s in doc.get("skipped", [])) or "stopped early"
        out += [f"_This run is incomplete ({why}); the tables hold every point it measured._", ""]
    if doc.get("timing"):
        out += [f"Timing: {doc['timing']}. FLOPs: forward 4·b·s_q·s_k·h·d, halved for causal; backward 2.5x forward.",
                ""]
    out += _in_short(doc, decode_doc)
    out += ["### Throughput", ""]
    table = headline_table(doc)
    out += [table or "_No forward/backward points in this run._", ""]
    ratios = ratios_to_peers(doc)
    if ratios:
        out += ["This kernel over each peer, over every measured point with seqlen >= 2048 (median, and range):", "",
                "| op | dtype | peer | ours / peer (median) | range | points |", "|---|---|---|---:|---|---:|"]
        out += [f"| {op} | {dt} | {peer} | {med:.2f}x | {lo:.2f}x – {hi:.2f}x | {n} |"
                for op, dt, peer, med, lo, hi, n in ratios]
        out.append("")
    plots = bench.plot_paths(path, doc)
    for key, plot in plots.items():
        if key.startswith("tflops-") and plot.is_file():
            out += [f"![{key}]({_rel(plot, page_dir)})", ""]
    out += ["### Latency", ""]
    out += _latency_table(doc)
    decode = [r for r in decode_doc.get("records", []) if r.get("op") == "decode"]
    if decode:
        d = decode[0]
        if decode_path != path:
            out += ["", f"Decode from an earlier run, the newest with decode points: "
                        f"`{decode_path.relative_to(project).as_posix()}` ({decode_doc.get('date', '')[:10]})."]
        out += ["", f"Decode latency (one new token per sequence; batch {d['batch']}, cache {d['seqlen_k']}, heads "
                    f"{d['heads_q']}:{d['heads_kv']}, head dim {d['hdim']}). This kernel reads a paged cache through "
                    f"`flash_attn_with_kvcache` with a `block_table` (page {d.get('page_size')}); SDPA reads the same "
                    "K/V from a contiguous cache. GB/s counts the K/V bytes each step must read.", "",
                "| dtype | implementation | µs | GB/s |", "|---|---|---:|---:|"]
        out += [f"| {r['dtype']} | {r['impl']} | {r['ms'] * 1e3:.0f} | {r['gbps']:.0f} |" if r.get("ms") else
                f"| {r['dtype']} | {r['impl']} | — ({(r.get('error') or '')[:80]}) | — |" for r in decode]
        decode_plot = bench.plot_paths(decode_path, decode_doc).get("decode")
        if decode_plot and decode_plot.is_file():
            out += ["", f"![decode]({_rel(decode_plot, page_dir)})"]
        out.append("")
    out += ["### Memory", "", f"Peak memory: {doc.get('memory_method', 'not recorded')}.", ""]
    out += _memory_table(doc)
    for key, plot in plots.items():
        if key.startswith("memory-") and plot.is_file():
            out += ["", f"![{key}]({_rel(plot, page_dir)})"]
    errors = sorted({(r["impl"], r["error"].split(":")[0]) for r in doc.get("records", []) if r.get("error")})
    if errors:
        out += ["", "Points a peer could not run (recorded, not measured): " +
                ", ".join(f"{impl} ({err})" for impl, err in errors) + "."]
    md = path.with_suffix(".md")
    if md.is_file():
        out += ["", f"Every point: [{md.name}]({_rel(md, page_dir)})."]
    return out


def _in_short(doc: dict, decode_doc: dict) -> list[str]:
    """The fastest implementation per op and the decode winner (from `decode_doc`), over the headline points, in words."""
    rows = [r for r in headline_records(doc) if r.get("tflops")]
    lines = []
    for op in ("fwd", "bwd"):
        per_impl: dict[str, list[float]] = {}
        for r in rows:
            if r["op"] == op and r["seqlen_q"] >= 2048:
                per_impl.setdefault(r["impl"], []).append(r["tflops"])
        if per_impl:
            ranked = sorted(per_impl, key=lambda n: -statistics.median(per_impl[n]))
            lines.append(f"- **{'Forward' if op == 'fwd' else 'Backward'}** (training shapes, seqlen >= 2048): fastest "
                         f"is `{ranked[0]}` ({statistics.median(per_impl[ranked[0]]):.0f} TFLOP/s median), then " +
                         ", ".join(f"`{n}` ({statistics.median(per_impl[n]):.0f})" for n in ranked[1:]) + ".")
    decode = sorted((r for r in decode_doc.get("records", []) if r.get("op") == "decode" and r.get("ms")),
                    key=lambda r: r["ms"])
    if decode:
        d = decode[0]
        lines.append(f"- **Decode** ({d['dtype']}): fastest is `{d['impl']}` at {d['ms'] * 1e3:.0f} µs per step "
                     f"({d['gbps']:.0f} GB/s of K/V).")
    oom = sorted({r["impl"] for r in doc.get("records", []) if "OutOfMemory" in (r.get("error") or "")})
    if oom:
        lines.append("- **Memory**: " + ", ".join(f"`{n}`" for n in oom) + " ran out of memory at the longest "
                     "sequences; flash-style kernels keep memory linear in sequence length (table below).")
    return (["In short, on this card:", "", *lines, ""]) if lines else []


def _points_table(doc: dict, cell) -> list[str]:
    rows = headline_records(doc)
    if not rows:
        return ["_No forward/backward points in this run._"]
    impls = bench._ordered_impls(rows)
    points: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        points.setdefault((r["op"], r["causal"], r["seqlen_q"], r["batch"]), {})[r["impl"]] = r
    lines = ["| op | causal | seqlen | batch | " + " | ".join(impls) + " |", "|---|---|---|---|" + "---:|" * len(impls)]
    for (op, causal, seqlen, batch), vals in sorted(points.items(), key=lambda kv: (kv[0][0] != "fwd", kv[0][1:])):
        lines.append(f"| {op} | {'yes' if causal else 'no'} | {seqlen} | {batch} | " +
                     " | ".join(cell(vals.get(n)) for n in impls) + " |")
    return lines


def _latency_table(doc: dict) -> list[str]:
    rows = headline_records(doc)
    head = ["Milliseconds per call, same points as above (lower is better):", ""] if rows else []
    return head + _points_table(doc, lambda r: f"{r['ms']:.3f}" if r and r.get("ms") else "—") + [""]


def _memory_table(doc: dict) -> list[str]:
    rows = headline_records(doc)
    head = ["Peak MiB beyond the inputs, same points (lower is better). batch·seqlen is fixed, so an implementation "
            "that materializes the score matrix grows 2x per doubling of seqlen, while a flash-style kernel stays "
            "flat (its extra memory is the output and the softmax statistics):", ""] if rows else []
    return head + _points_table(doc, lambda r: bench._mib(r.get("peak_mem_bytes")) if r and r.get("ms") else
                                ("OOM" if r and "OutOfMemory" in (r.get("error") or "") else "—"))


def _build_section(found, project: Path) -> list[str]:
    if not found:
        return ["_Not measured yet_: no results file of `python benchmarks/build_vs_hub.py` under "
                "`benchmarks/results/`."]
    path, doc = found
    archs = doc.get("cuda_archs_override")
    # The environment narrowing the build's architectures is part of the command that reproduces it.
    command = (f"FLASH_ATTN_CUDA_ARCHS={archs} " if archs else "") + doc.get("command", "")
    out = [_source_line(doc, path, project), "", "```bash", command, "```", ""]
    if doc.get("error"):
        return out + [f"The build failed: `{doc['error'][:300]}`"]
    s = doc.get("summary", {})
    mib = doc.get("variant_bytes", 0) / 2**20
    toolchain = ("a CUDA toolkit and a C++ compiler matching the variant" if "-cu" in doc["variant"] else
                 "a C++ compiler and torch's headers")
    hub_load = (f"took **{s['hub']['load_s']:.2f} s** in a fresh process" if "hub" in s else "was not measured")
    out += ["### Time to a working kernel", "",
            f"Building `{doc['variant']}` from source with this project's builder took **{doc['build_s']:.0f} s** on "
            f"{doc.get('cores')} cores"
            + (f" for compute capability {archs} only (FLASH_ATTN_CUDA_ARCHS, the card it ran on)" if archs else "")
            + f" (and needs {toolchain}). Loading the "
            f"published build with `kernels.get_kernel` {hub_load}, plus the download of the variant ({mib:.1f} MiB) "
            "from the Hub; nothing is compiled.", ""]
    if "source" in s and "hub" in s:
        shape = doc["speed_shape"]
        out += ["### Throughput", "",
                "| | from source | from the Hub |", "|---|---:|---:|",
                f"| build | {doc['build_s']:.1f} s | — |",
                f"| load (fresh process, median of {doc['rounds']}) | {s['source']['load_s']:.2f} s | "
                f"{s['hub']['load_s']:.2f} s |",
                f"| fwd+bwd {shape['dtype']} b{shape['batch']} s{shape['seqlen']} h{shape['heads']} d{shape['hdim']}"
                f"{' causal' if shape['causal'] else ''} | {s['source']['ms']:.3f} ms | {s['hub']['ms']:.3f} ms |",
                "", f"The Hub kernel runs at {s['speed_ratio_hub_over_source']:.3f}x the speed of the source build: "
                    + ("the same binary, identical within run-to-run noise." if s["identical_within_noise"] else
                       "outside run-to-run noise; see the JSON.")]
    return out


def _train_section(found, project: Path, page_dir: Path) -> list[str]:
    if not found:
        return ["_Not measured yet_: no results file of `python benchmarks/train_loop.py` under `benchmarks/results/`."]
    path, doc = found
    m = doc["model"]
    out = [_source_line(doc, path, project), "", "```bash", doc.get("command", ""), "```", "",
           f"A Llama-like model from a config ({m['layers']} layers, hidden {m['hidden']}, {m['heads']} heads, "
           f"{m['kv_heads']} kv heads, vocabulary {m['vocab']}; bf16 weights, AdamW), {doc['tokens_per_step']} tokens "
           f"per optimizer step, {doc['steps']} timed steps after {doc['warmup_steps']} warm-up, per attention "
           "implementation and sequence length. Peak memory is for the whole step: "
           f"{doc.get('memory_method')}.", ""]
    records = doc.get("records", [])
    impls = list(dict.fromkeys(r["impl"] for r in records))
    seqlens = sorted({r["seqlen"] for r in records})
    by = {(r["impl"], r["seqlen"]): r for r in records}
    out += ["| seqlen | " + " | ".join(impls) + " |", "|---|" + "---:|" * len(impls)]
    for s in seqlens:
        cells = []
        for impl in impls:
            r = by.get((impl, s))
            if r and r.get("tokens_per_s"):
                cells.append(f"{r['tokens_per_s']:,.0f} tok/s, {r['peak_mem_bytes'] / 2**30:.1f} GiB")
            else:
                cells.append("OOM" if r and "OutOfMemory" in (r.get("error") or "") else "—")
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    speedups = []
    for base in ("sdpa", "eager"):
        for suffix in ("", " + liger"):
            for s in seqlens:
                ours, other = by.get(("flash-attn-kernel" + suffix, s)), by.get((base + suffix, s))
                if ours and other and ours.get("tokens_per_s") and other.get("tokens_per_s"):
                    speedups.append(f"| {s} | {base}{suffix} | {ours['tokens_per_s'] / other['tokens_per_s']:.2f}x | "
                                    f"{(other['peak_mem_bytes'] - ours['peak_mem_bytes']) / 2**30:+.1f} GiB |")
    if speedups:
        out += ["", "This kernel against the other implementations (speed-up in tokens/s; memory saved per step, "
                    "positive when this kernel uses less):", "",
                "| seqlen | against | speed-up | memory saved |", "|---|---|---:|---:|", *speedups]
    liger = []
    for impl in [i for i in impls if not i.endswith(" + liger")]:
        for s in seqlens:
            a, b = by.get((impl, s)), by.get((impl + " + liger", s))
            if a and b and a.get("tokens_per_s") and b.get("tokens_per_s"):
                liger.append(f"| {impl} | {s} | {b['tokens_per_s'] / a['tokens_per_s']:.2f}x | "
                             f"{(a['peak_mem_bytes'] - b['peak_mem_bytes']) / 2**30:+.1f} GiB |")
    if liger:
        out += ["", "Adding Liger kernels (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy):", "",
                "| attention | seqlen | speed-up | memory saved |", "|---|---|---:|---:|", *liger]
    plot = path.with_suffix(".png")
    if plot.is_file():
        out += ["", f"![training loop]({_rel(plot, page_dir)})"]
    failures = sorted({(r["impl"], r["seqlen"], (r.get("error") or "").split(":")[0]) for r in records if r.get("error")})
    if failures:
        out += ["", "Did not run: " + ", ".join(f"{i} at {s} ({e})" for i, s, e in failures) + "."]
    return out
