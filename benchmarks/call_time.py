"""Where a call's time goes, ours against SDPA's backends, on the bench's shapes.

For each implementation and point: the host time of one call (from the call to its return, after a
synchronization), the time the bench records (CUDA events around one call after a synchronization,
so a call pays the host work before its first launch on an idle GPU), the same behind a sleep kernel
(host work hidden), and the device time of its kernels (torch.profiler, back to back). Needs a CUDA
build in build/ (`flash-attn-kernel build`).
  usage: python3 benchmarks/call_time.py --op decode
         python3 benchmarks/call_time.py --op fwd --hdim 128 --seqlens 2048,16384 --causal
         python3 benchmarks/call_time.py --op bwd --seqlens 2048 --first-launch
         python3 benchmarks/call_time.py --op bwd --hdim 64 --kernels
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from flash_attn_kernel import bench

TOKENS, HIDDEN = 16384, 2048  # the bench's training shapes: batch * seqlen tokens, heads * hdim


def host_us(step, n: int) -> float:
    """Median host time of one call after a synchronization (back-to-back calls would fill the launch
    queue and wait for the GPU, counting device time as host time)."""
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def event_us(step, n: int) -> float:
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        times.append(bench._time_call(step, cuda=True) * 1e3)
    return statistics.median(times)


def queued_us(step, n: int) -> float:
    """Events around one call enqueued behind a ~2 ms sleep kernel: the call's host work is hidden, so
    this is the call's own time on the device, launches and gaps between its kernels included."""
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(4_000_000)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def device_us(step, n: int, kernels: list | None = None) -> float:
    """Device time of one call's kernels (and copies / memsets), run back to back; with `kernels`,
    appends (name, us per call) for each of them, longest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    if kernels is not None:
        kernels.extend(sorted(((e.key, e.device_time_total / n) for e in events), key=lambda x: -x[1]))
    return sum(e.device_time_total for e in events) / n


def first_launch(step, limit: int = 80) -> None:
    """One call under torch.profiler (CPU and CUDA): the host events before its first kernel starts,
    in time order (start and duration in us from the first event): what the host does first."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    t0 = events[0].time_range.start
    kernels = [e.time_range.start for e in events if e.device_type == DeviceType.CUDA]
    first = min(kernels) if kernels else float("inf")
    print(f"  first kernel starts {first - t0:.1f} us after the first host event")
    host = [e for e in events if e.device_type == DeviceType.CPU and e.time_range.start <= first]
    for e in host[:limit]:
        print(f"  {e.time_range.start - t0:9.1f} {e.time_range.elapsed_us():9.1f}  {e.name}")
    if len(host) > limit:
        print(f"  ... {len(host) - limit} more host events before it")


def points(args) -> list:
    if args.op == "decode":
        hq, hkv = (int(x) for x in args.heads.split(":"))
        return [bench.Point("decode", "bf16", args.batch, 1, args.cache, hq, hkv, args.hdim, True, args.page)]
    heads = HIDDEN // args.hdim
    return [bench.Point(args.op, "bf16", TOKENS // s, s, s, heads, heads, args.hdim, args.causal)
            for s in (int(x) for x in args.seqlens.split(","))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=("decode", "fwd", "bwd"), default="decode")
    parser.add_argument("--hdim", type=int, default=128)
    parser.add_argument("--seqlens", default="2048,16384", help="fwd / bwd: seqlens (batch = 16k tokens / seqlen)")
    parser.add_argument("--causal", action="store_true", help="fwd / bwd: causal")
    parser.add_argument("--batch", type=int, default=64, help="decode: batch")
    parser.add_argument("--cache", type=int, default=8192, help="decode: cache length")
    parser.add_argument("--heads", default="32:8", help="decode: query:kv heads")
    parser.add_argument("--page", type=int, default=256, help="decode: page size")
    parser.add_argument("--first-launch", action="store_true",
                        help="instead of the timings: the host events of one call before its first kernel")
    parser.add_argument("--kernels", action="store_true", help="after each row: its kernels' device time per call")
    args = parser.parse_args()
    kernel = bench._load_kernel(Path.cwd(), "cuda")
    impls = bench.implementations(kernel, "cuda", args.op, "ours", ["sdpa-cudnn", "sdpa-flash"])
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'point':40} {'impl':11} {'host us':>9} {'event us':>10} {'queued us':>10} {'device us':>10}")
    for point in points(args):
        where = point.describe()
        for name, factory in impls.items():
            step = bench._prepare(factory, point, "cuda", torch.bfloat16)
            if args.first_launch:
                print(f"{where} {name}")
                first_launch(step)
                continue
            kernels = [] if args.kernels else None
            print(f"{where:40} {name:11} {host_us(step, 30):9.1f} {event_us(step, 30):10.1f} {queued_us(step, 30):10.1f} "
                  f"{device_us(step, 10, kernels):10.1f}", flush=True)
            for kernel_name, us in kernels or []:
                print(f"    {us:10.1f}  {kernel_name[:110]}")


if __name__ == "__main__":
    main()
