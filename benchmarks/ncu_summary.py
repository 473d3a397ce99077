"""Summarize an Nsight Compute source page: where one kernel's warps wait, by stall reason and by
SASS instruction.

    ncu --set full -k regex:NAME --launch-skip N --launch-count 1 -o rep BINARY
    ncu --import rep.ncu-rep --page source --csv --print-source sass > sass.csv
    python3 benchmarks/ncu_summary.py sass.csv [--top 40]      (.csv or .csv.gz)
    python3 benchmarks/ncu_summary.py ours.csv.gz --against peer.csv.gz

Prints the share of warp-state samples per stall reason, then the instructions holding the most
samples with their two main reasons and the running total in program order (a region of the
kernel is a run of consecutive addresses). ci/gpu-profile.sh runs the whole sequence on the device.
With --against: instead, the two kernels' executed instructions by opcode side by side (millions,
most first) and each opcode's share of the samples, e.g. ours next to SDPA's kernel on one shape.
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import io
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"
# Opcodes kept whole in the mix (their variants differ in cost: widths, transposes, atomics); the
# rest by their first name (IMAD.MOV and IMAD.WIDE count as IMAD).
WHOLE = ("HMMA", "HGMMA", "LDSM", "LDS", "STS", "LDG", "STG", "LDGSTS", "RED", "REDG", "ATOM", "ATOMG", "SHFL", "BAR")


def read_rows(path: str) -> tuple[str, list[dict[str, str]]]:
    raw = gzip.open(path, "rt") if path.endswith(".gz") else open(path, newline="")
    with raw as f:
        text = f.read()
    lines = text.splitlines()
    # ncu prints the kernel's name on a line of its own before the table.
    start = next(i for i, line in enumerate(lines) if line.startswith('"Address"'))
    kernel = lines[start - 1].split(",", 1)[-1].strip().strip('",') if start else ""
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))
    if not rows or SAMPLES not in rows[0]:
        raise SystemExit(f"{path}: no '{SAMPLES}' column (profile with --set full)")
    return kernel, rows


def count(row: dict[str, str], key: str) -> int:
    value = row.get(key, "")
    return int(value) if value.isdigit() else 0


def summarize(path: str, top: int) -> str:
    kernel, rows = read_rows(path)
    reasons = [k for k in rows[0] if k.startswith("stall_") and "Not Issued" not in k]
    total = sum(count(r, SAMPLES) for r in rows) or 1
    by_reason = collections.Counter({k: sum(count(r, k) for r in rows) for k in reasons})
    out = [f"kernel: {kernel}", f"warp-state samples: {total}", "", "stall reasons (share of samples):"]
    out += [f"  {k.removeprefix('stall_'):<20} {100 * v / total:5.1f}%" for k, v in by_reason.most_common(10)]
    hot = {id(r) for r in sorted(rows, key=lambda r: -count(r, SAMPLES))[:top]}
    out += ["", f"top {top} instructions (share, running total in program order, address, SASS, main reasons):"]
    running = 0
    for r in rows:
        running += count(r, SAMPLES)
        if id(r) not in hot:
            continue
        main = sorted(((count(r, k), k.removeprefix("stall_")) for k in reasons), reverse=True)[:2]
        why = ", ".join(f"{name} {n}" for n, name in main if n)
        share = 100 * count(r, SAMPLES) / total
        out.append(f"  {share:5.2f}% {100 * running / total:6.2f}%  {r['Address'][-5:]}  {r['Source'].strip()[:64]:<64}  {why}")
    return "\n".join(out)


def opcode(source: str) -> str:
    words = source.split()
    if words and words[0].startswith("@"):  # predicate
        words = words[1:]
    op = words[0] if words else "?"
    return op if op.split(".")[0] in WHOLE else op.split(".")[0]


def instruction_mix(path: str) -> tuple[str, collections.Counter, collections.Counter]:
    """(kernel, executed instructions per opcode, samples per opcode)."""
    kernel, rows = read_rows(path)
    executed, samples = collections.Counter(), collections.Counter()
    for r in rows:
        op = opcode(r["Source"])
        executed[op] += count(r, EXECUTED)
        samples[op] += count(r, SAMPLES)
    return kernel, executed, samples


def compare(path: str, against: str, top: int) -> str:
    mixes = [instruction_mix(path), instruction_mix(against)]
    out = [f"A: {mixes[0][0]}", f"B: {mixes[1][0]}", "",
           f"{'opcode':<30} {'A (M)':>9} {'B (M)':>9} {'A-B (M)':>9} {'A samples':>10} {'B samples':>10}"]
    executed = [m[1] for m in mixes]
    sampled = [sum(m[2].values()) or 1 for m in mixes]
    for op, _ in (executed[0] + executed[1]).most_common(top):
        a, b = executed[0][op], executed[1][op]
        out.append(f"{op:<30} {a / 1e6:9.1f} {b / 1e6:9.1f} {(a - b) / 1e6:9.1f} "
                   f"{100 * mixes[0][2][op] / sampled[0]:9.2f}% {100 * mixes[1][2][op] / sampled[1]:9.2f}%")
    a, b = sum(executed[0].values()), sum(executed[1].values())
    out.append(f"{'all':<30} {a / 1e6:9.1f} {b / 1e6:9.1f} {(a - b) / 1e6:9.1f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="ncu --page source --csv --print-source sass output (.csv or .csv.gz)")
    parser.add_argument("--top", type=int, default=40, help="instructions (or opcodes) to list (default 40)")
    parser.add_argument("--against", default=None,
                        help="a second kernel's source page: compare the two instruction mixes instead")
    args = parser.parse_args(argv)
    print(compare(args.csv, args.against, args.top) if args.against else summarize(args.csv, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
