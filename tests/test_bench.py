"""The benchmark pipeline on CPU: results files, their tables and plots, interruptions, the comparison
page and the card's headline. Runs without a GPU, in seconds (tiny grid, cheap peers only)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from flash_attn_kernel import bench, card, cli, comparison

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

TINY_GRID = ["--device", "cpu", "--ops", "fwd,bwd,decode", "--hdims", "32", "--seqlens", "64", "--dtypes", "fp32",
             "--tokens", "128", "--hidden", "64", "--peers", "sdpa-math,eager", "--repeats", "2", "--min-repeats", "1",
             "--decode-batch", "2", "--decode-cache", "128", "--decode-heads", "4:2", "--decode-hdim", "32",
             "--page-size", "32"]
RECORD_KEYS = {"impl", "op", "dtype", "batch", "seqlen_q", "seqlen_k", "heads_q", "heads_kv", "hdim", "causal", "ms",
               "tflops", "gbps", "peak_mem_bytes", "error", "repeats", "page_size"}


@pytest.fixture
def project(tmp_path: Path, built_cpu_variant: Path) -> Path:
    """A scratch project whose build/ holds the session's CPU build, so results land in tmp_path."""
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / built_cpu_variant.name).symlink_to(built_cpu_variant)
    return tmp_path


def run_bench(project: Path, *args: str) -> int:
    return cli.main(["--project", str(project), "bench", *args])


def test_tiny_cpu_grid_writes_json_markdown_and_plots(project: Path):
    assert run_bench(project, *TINY_GRID, "--name", "tiny") == 0
    results = project / "benchmarks" / "results"
    doc = json.loads((results / "tiny.json").read_text())
    assert doc["kind"] == "attention" and doc["complete"] is True
    for key in ("device", "torch", "kernels", "date", "command", "memory_method", "peer_sources", "cpu_threads"):
        assert doc[key], key
    assert doc["command"] == f"flash-attn-kernel --project {project} bench " + " ".join(TINY_GRID) + " --name tiny"
    records = doc["records"]
    assert all(set(r) == RECORD_KEYS for r in records)
    # 2 masks x 2 ops x 3 implementations, plus decode with ours and the one SDPA peer asked for.
    assert len(records) == 2 * 2 * 3 + 2
    ours = [r for r in records if r["impl"] == "flash-attn-kernel[cpu]" and r["op"] != "decode"]
    assert ours and all(r["ms"] > 0 and r["tflops"] > 0 and r["peak_mem_bytes"] is not None for r in ours)
    assert {r["impl"] for r in records if r["op"] == "fwd"} == {"flash-attn-kernel[cpu]", "sdpa-math", "eager"}
    decode = [r for r in records if r["op"] == "decode"]
    assert {r["impl"] for r in decode} == {"flash-attn-kernel[cpu]", "sdpa-math"}
    assert all(r["gbps"] > 0 and r["page_size"] == 32 and r["seqlen_q"] == 1 for r in decode)
    md = (results / "tiny.md").read_text()
    assert "### fwd fp32: TFLOP/s (peak MiB)" in md and "ours / best peer" in md and "### decode" in md
    pytest.importorskip("matplotlib")
    for path in bench.plot_paths(results / "tiny.json", doc).values():
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def test_a_failing_peer_is_recorded_and_the_run_goes_on(project: Path, monkeypatch):
    def broken(q, k, v, causal):
        raise RuntimeError("CUDA out of memory (simulated)")
    real = bench.implementations

    def with_broken_peer(*args, **kwargs):
        impls = real(*args, **kwargs)
        impls["sdpa-math"] = broken
        return impls
    monkeypatch.setattr(bench, "implementations", with_broken_peer)
    assert run_bench(project, *TINY_GRID, "--ops", "fwd", "--seqlens", "64", "--causal", "false", "--name", "f") == 0
    doc = json.loads((project / "benchmarks" / "results" / "f.json").read_text())
    failed = [r for r in doc["records"] if r["impl"] == "sdpa-math"]
    assert failed[0]["ms"] is None and "simulated" in failed[0]["error"]
    assert any(r["impl"] == "eager" and r["ms"] for r in doc["records"])


def test_an_interrupted_run_keeps_every_point_it_measured(project: Path, monkeypatch):
    real, calls = bench.measure_point, []

    def measure_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a SIGTERM from `timeout` becomes
        return real(*args, **kwargs)
    monkeypatch.setattr(bench, "measure_point", measure_then_stop)
    assert run_bench(project, *TINY_GRID, "--name", "cut") == 130
    results = project / "benchmarks" / "results"
    doc = json.loads((results / "cut.json").read_text())
    assert len(doc["records"]) == 3 and doc["complete"] is False
    assert doc["skipped"][0]["why"] == "interrupted"
    assert "**Incomplete run** (interrupted)" in (results / "cut.md").read_text()


@pytest.mark.parametrize("interleave", [True, False])
def test_implementations_take_turns_on_cpu(project: Path, monkeypatch, interleave: bool):
    """On CPU a point's implementations take turns call by call by default; --no-interleave times each in one go."""
    order = []

    def logged(name):
        def make(q, k, v, causal):
            return lambda: order.append(name)
        return make
    monkeypatch.setattr(bench, "implementations", lambda *a, **kw: {"a": logged("a"), "b": logged("b")})
    flag = [] if interleave else ["--no-interleave"]
    assert run_bench(project, *TINY_GRID, "--ops", "fwd", "--causal", "false", "--repeats", "3", "--min-repeats",
                     "3", *flag, "--name", "turns") == 0
    # one warm-up call each, then three timed calls each: in rounds whose order rotates, or in one go
    assert order == (["a", "b", "a", "b", "b", "a", "a", "b"] if interleave else ["a"] * 4 + ["b"] * 4)
    doc = json.loads((project / "benchmarks" / "results" / "turns.json").read_text())
    assert [r["repeats"] for r in doc["records"]] == [3, 3]
    assert ("interleaved" in doc["timing"]) == interleave


def test_the_json_on_disk_holds_every_record_as_soon_as_it_is_measured(tmp_path: Path):
    """A hard kill (no handler runs) loses nothing already measured: the file is rewritten after each record."""
    path = tmp_path / "run.json"
    results = bench.ResultsFile(path, {"kind": "attention", "device": "x", "commands": ["c"], "records": []})
    assert json.loads(path.read_text())["records"] == []
    rec = bench.Record("sdpa-math", "fwd", "fp32", 1, 64, 64, 2, 2, 32, False, 1.0, 0.1, None, 10)
    results.add(rec)
    assert json.loads(path.read_text())["records"][0]["impl"] == "sdpa-math"
    assert not list(tmp_path.glob(".*.tmp"))


def test_append_and_time_budget(project: Path):
    assert run_bench(project, *TINY_GRID, "--ops", "decode", "--name", "two") == 0
    assert run_bench(project, *TINY_GRID, "--name", "two", "--append", "--time-budget", "0") == 0
    doc = json.loads((project / "benchmarks" / "results" / "two.json").read_text())
    assert len(doc["records"]) == 2 and len(doc["commands"]) == 2
    assert "time budget" in doc["skipped"][0]["why"] and doc["complete"] is False


# -- fixtures for the report generators ------------------------------------------------------------
def attention_run(device: str = "NVIDIA H100 80GB HBM3", date: str = "2026-11-26T10:00:00+00:00") -> dict:
    records = []
    for op, base in (("fwd", 300.0), ("bwd", 200.0)):
        for seqlen in (512, 2048, 8192, 16384):
            for causal in (False, True):
                for impl, scale in (("flash-attn-kernel[sm90]", 1.1), ("sdpa-cudnn", 1.0), ("sdpa-flash", 0.6),
                                    ("flex", 0.5), ("eager", 0.1)):
                    oom = impl == "eager" and seqlen == 16384
                    records.append({"impl": impl, "op": op, "dtype": "bf16", "batch": 16384 // seqlen, "seqlen_q": seqlen,
                                    "seqlen_k": seqlen, "heads_q": 16, "heads_kv": 16, "hdim": 128, "causal": causal,
                                    "ms": None if oom else 1.0, "tflops": None if oom else base * scale, "gbps": None,
                                    "peak_mem_bytes": None if oom else 64 * 2**20,
                                    "error": "OutOfMemoryError: CUDA out of memory" if oom else None})
    for impl, us in (("flash-attn-kernel[sm90]", 700.0), ("sdpa-cudnn", 708.0)):
        records.append({"impl": impl, "op": "decode", "dtype": "bf16", "batch": 64, "seqlen_q": 1, "seqlen_k": 8192,
                        "heads_q": 32, "heads_kv": 8, "hdim": 128, "causal": True, "ms": us / 1e3, "tflops": 1.0,
                        "gbps": 3000.0 * 708 / us, "peak_mem_bytes": 0, "error": None, "page_size": 256})
    return {"kind": "attention", "device": device, "torch": "2.11.0+cu130", "cuda": "13.0", "cudnn": 91900,
            "kernels": "0.17.2", "driver": "580.00", "clocks": "1980 MHz, 1980 MHz, 2619 MHz, 2619 MHz",
            "date": date, "command": "flash-attn-kernel bench --name fixture", "commands": ["flash-attn-kernel bench --name fixture"],
            "git": "abc", "memory_method": "max_memory_allocated delta", "complete": True, "records": records}


TRAIN_RUN = {
    "kind": "train-loop", "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "date": "2026-11-26T11:00:00+00:00",
    "command": "python benchmarks/train_loop.py", "tokens_per_step": 16384, "steps": 3, "warmup_steps": 1,
    "memory_method": "max_memory_allocated", "model": {"architecture": "LlamaForCausalLM", "layers": 4, "hidden": 2048,
                                                       "heads": 16, "kv_heads": 16, "intermediate": 5632, "vocab": 32000,
                                                       "dtype": "bfloat16", "optimizer": "AdamW"},
    "records": [{"impl": impl, "seqlen": s, "batch": 16384 // s, "tokens_per_s": tps, "step_ms": 100.0,
                 "peak_mem_bytes": gib * 2**30, "error": None}
                for impl, tps, gib in (("flash-attn-kernel", 60000.0, 20), ("sdpa", 50000.0, 21), ("eager", 20000.0, 60),
                                       ("flash-attn-kernel + liger", 70000.0, 12), ("sdpa + liger", 58000.0, 13))
                for s in (2048, 8192)],
}

BUILD_RUN = {
    "kind": "build-vs-hub", "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "date": "2026-11-26T12:00:00+00:00",
    "command": "python benchmarks/build_vs_hub.py", "variant": "torch-stable-abi211-cu130-x86_64-linux", "cores": 16,
    "variant_bytes": 30 * 2**20, "build_s": 77.0, "publish_s": 0.5, "rounds": 3,
    "speed_shape": {"batch": 2, "seqlen": 4096, "heads": 16, "hdim": 128, "dtype": "bfloat16", "causal": True},
    "summary": {"source": {"load_s": 0.3, "first_call_s": 0.5, "ms": 2.0, "ms_spread": 0.01},
                "hub": {"load_s": 0.31, "first_call_s": 0.5, "ms": 2.01, "ms_spread": 0.01},
                "speed_ratio_hub_over_source": 0.995, "identical_within_noise": True,
                "time_to_kernel_source_s": 77.3, "time_to_kernel_hub_s": 0.31},
}


def write_results(project: Path, **docs: dict) -> Path:
    results = project / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    for name, doc in docs.items():
        (results / f"{name}.json").write_text(json.dumps(doc))
    return results


def test_comparison_page_from_results(tmp_path: Path):
    write_results(tmp_path, **{"h100": attention_run(), "cpu": {**attention_run("AMD EPYC", "2026-12-01"), "cuda": None},
                               "train": TRAIN_RUN, "build": BUILD_RUN,
                               "build-times-x": {"host": "x", "records": [{"variant": "v", "seconds": 1}]}})
    page = comparison.render(tmp_path, tmp_path / "docs")
    assert "Not measured yet" not in page
    assert "Measured on **NVIDIA H100 80GB HBM3**" in page  # the GPU run wins over a newer CPU run
    assert "| fwd | no | 2048 | 330 | 180 | 300 | 150 | 30 | 1.10x |" in page
    assert "| fwd | bf16 | sdpa-cudnn | 1.10x |" in page
    assert "| bf16 | flash-attn-kernel[sm90] | 700 | 3034 |" in page  # decode µs and GB/s
    assert "OOM" in page and "eager (OutOfMemoryError)" in page
    assert "**77 s**" in page and "identical within run-to-run noise" in page
    assert "| 2048 | sdpa | 1.20x | +1.0 GiB |" in page and "| 2048 | eager | 3.00x | +40.0 GiB |" in page
    assert "| flash-attn-kernel | 2048 | 1.17x | +8.0 GiB |" in page  # Liger on top of our kernel
    assert "bash ci/gpu-bench.sh" in page and "flash-attn-kernel bench --name fixture" in page


def test_comparison_page_keeps_the_last_decode_run(tmp_path: Path):
    # A newer run of the training shapes alone (no decode points) leads the page; decode comes from
    # the newest run that measured it, named as such.
    newer = attention_run(date="2026-11-27T10:00:00+00:00")
    newer["records"] = [r for r in newer["records"] if r["op"] != "decode"]
    for r in newer["records"]:
        if r["impl"] == "flash-attn-kernel[sm90]" and r["tflops"]:
            r["tflops"] *= 2
    write_results(tmp_path, **{"h100-a": attention_run(), "h100-b": newer})
    page = comparison.render(tmp_path, tmp_path / "docs")
    assert "Results file: `benchmarks/results/h100-b.json`" in page
    assert "| fwd | no | 2048 | 660 |" in page
    assert "| bf16 | flash-attn-kernel[sm90] | 700 | 3034 |" in page
    assert "the newest with decode points: `benchmarks/results/h100-a.json` (2026-11-26)" in page
    assert "fastest is `flash-attn-kernel[sm90]` at 700 µs per step" in page


def test_comparison_page_without_results(tmp_path: Path):
    page = comparison.render(tmp_path, tmp_path / "docs")
    assert page.count("_Not measured yet_") == 3
    assert cli.main(["--project", str(tmp_path), "docs"]) == 0
    assert (tmp_path / "docs" / "attention-comparison.md").read_text() == page


def test_comparison_page_embeds_the_plots_that_exist(tmp_path: Path):
    results = write_results(tmp_path, h100=attention_run())
    (results / "h100-tflops-fwd-bf16.png").write_bytes(b"\x89PNG")
    page = comparison.render(tmp_path, tmp_path / "docs")
    assert "![tflops-fwd-bf16](../benchmarks/results/h100-tflops-fwd-bf16.png)" in page
    assert "h100-tflops-bwd-bf16.png" not in page


def test_card_shows_the_headline_table_and_plot(tmp_path: Path):
    results = write_results(tmp_path, h100=attention_run(), cpu={**attention_run("AMD EPYC", "2026-12-01"), "cuda": None})
    (results / "build-times-x.json").write_text(json.dumps({"host": "x", "records": [{"variant": "v", "seconds": 1}]}))
    runs = card.latest_runs(results)
    # Build times are not an attention run; the GPU run heads the card even when a CPU run is newer.
    assert [r["device"] for r in runs] == ["NVIDIA H100 80GB HBM3", "AMD EPYC"]
    text = card._benchmarks_markdown(runs, "media/benchmarks.svg")
    assert "**Headline**" in text and "ours / best peer" in text
    assert "| bwd | yes | 16384 | 220 | 120 | 200 | 100 | — | 1.10x |" in text
    assert "![TFLOP/s per implementation" in text
    svg = card.benchmark_svg({**runs[0], "records": comparison.headline_records(runs[0])})
    assert "fwd bf16 b8 s2048/2048 h16 d128" in svg and "s512/" not in svg


def test_render_redraws_a_results_file(tmp_path: Path):
    results = write_results(tmp_path, h100=attention_run())
    assert cli.main(["bench", "--render", str(results / "h100.json")]) == 0
    assert "| 128 | 16384 | True | 1×16 |" in (results / "h100.md").read_text()


def test_train_loop_and_build_vs_hub_reports():
    import build_vs_hub
    import train_loop

    md = train_loop.markdown(TRAIN_RUN)
    assert "| 2048 | 8 | 60000 (20.0) | 50000 (21.0) | 20000 (60.0) | 70000 (12.0) | 58000 (13.0) | 1.20x, 1.21x + liger |" in md
    md = build_vs_hub.markdown(BUILD_RUN | {"publish_s": 0.5})
    assert "| build | 77.0 s |" in md and "identical within noise" in md
    summary = build_vs_hub.summarize({"source": [{"load_s": 1, "first_call_s": 1, "ms": 2.0}],
                                      "hub": [{"load_s": 1, "first_call_s": 1, "ms": 2.5}]}, 60.0)
    assert summary["identical_within_noise"] is False and summary["time_to_kernel_source_s"] == 61.0


def test_ncu_summary_ranks_stall_reasons_and_instructions(tmp_path: Path) -> None:
    """benchmarks/ncu_summary.py on a source page in ncu's CSV shape (kernel line, then the table)."""
    import gzip

    import ncu_summary

    header = ['"Address"', '"Source"', '"Warp Stall Sampling (All Samples)"', '"stall_barrier"', '"stall_long_sb"',
              '"stall_barrier (Not Issued)"']
    rows = [["0x10", "  HGMMA.64x64x16.F32.BF16 R1", "90", "80", "10", "80"],
            ["0x20", "  SHFL.BFLY PT, R2, R3, 0x1, 0x1f", "10", "0", "10", "0"],
            ["0x30", "  EXIT", "", "", "", ""]]
    text = '"Kernel Name","void k<int>(Args)",\n' + ",".join(header) + "\n"
    text += "\n".join(",".join(f'"{v}"' for v in row) for row in rows) + "\n"
    path = tmp_path / "sass.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write(text)
    out = ncu_summary.summarize(str(path), top=1)
    assert "kernel: void k<int>(Args)" in out
    assert "warp-state samples: 100" in out
    reasons = out.split("stall reasons")[1].split("top 1")[0]
    assert reasons.index("barrier") < reasons.index("long_sb")  # 80 before 20
    assert " 80.0%" in reasons and " 20.0%" in reasons
    listed = out.split("top 1 instructions")[1]
    assert "HGMMA" in listed and "SHFL" not in listed and "barrier 80, long_sb 10" in listed
    with pytest.raises(SystemExit, match="no 'Warp Stall Sampling"):
        bare = tmp_path / "bare.csv"
        bare.write_text('"Address","Source"\n"0x10","EXIT"\n')
        ncu_summary.summarize(str(bare), top=1)


def test_ncu_summary_compares_instruction_mixes(tmp_path: Path) -> None:
    """--against: executed instructions per opcode of two kernels, predicates and IMAD variants folded."""
    import ncu_summary

    def page(name: str, rows: list[list[str]]) -> str:
        header = ['"Address"', '"Source"', '"Warp Stall Sampling (All Samples)"', '"Instructions Executed"']
        text = f'"Kernel Name","{name}",\n' + ",".join(header) + "\n"
        path = tmp_path / f"{name}.csv"
        path.write_text(text + "\n".join(",".join(f'"{v}"' for v in row) for row in rows) + "\n")
        return str(path)

    ours = page("ours", [["0x10", "HMMA.16816.F32.BF16 R4, R8, R12, R4", "60", "3000000"],
                         ["0x20", "@P0 IMAD.MOV.U32 R1, RZ, RZ, R2", "30", "2000000"],
                         ["0x30", "IMAD.WIDE R2, R3, 0x4, R4", "10", "1000000"]])
    peer = page("peer", [["0x10", "HMMA.16816.F32.BF16 R4, R8, R12, R4", "90", "3000000"],
                         ["0x20", "LEA R2, P0, R3, R4, 0x2", "10", "500000"]])
    out = ncu_summary.compare(ours, peer, top=10)
    lines = {line.split()[0]: line.split() for line in out.splitlines()[3:]}
    assert lines["IMAD"][1:4] == ["3.0", "0.0", "3.0"]  # IMAD.MOV (predicated) + IMAD.WIDE
    assert lines["HMMA.16816.F32.BF16"][1:4] == ["3.0", "3.0", "0.0"]
    assert lines["LEA"][1:4] == ["0.0", "0.5", "-0.5"]
    assert lines["all"][1:4] == ["6.0", "3.5", "2.5"]
    assert lines["IMAD"][4] == "40.00%" and lines["HMMA.16816.F32.BF16"][5] == "90.00%"


def test_call_time_parses_its_arguments() -> None:
    """benchmarks/call_time.py (a device tool) imports and documents its options without a GPU."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "call_time.py"
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "Where a call's time goes" in done.stdout and "--op" in done.stdout


def test_peer_calls_runs_a_peer_on_cpu() -> None:
    """benchmarks/peer_calls.py (what ci/gpu-profile.sh's COMMAND profiles) calls a peer at a bench
    point, and names the implementations it has when asked for one it has not."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    script = root / "benchmarks" / "peer_calls.py"
    env = {**os.environ, "PYTHONPATH": str(root)}
    base = [sys.executable, str(script), "--device", "cpu", "--tokens", "128", "--seqlen", "64", "--hdim", "64"]
    done = subprocess.run(base + ["--impl", "sdpa-flash", "--op", "bwd", "--calls", "2"],
                          capture_output=True, text=True, check=False, env=env)
    assert done.returncode == 0, done.stderr
    assert "2 calls of sdpa-flash: bwd bf16 d64 s64/64 b2 h32" in done.stdout
    done = subprocess.run(base + ["--impl", "sdpa-cudnn"], capture_output=True, text=True, check=False, env=env)
    assert done.returncode == 2 and "not one of" in done.stderr and "sdpa-flash" in done.stderr
