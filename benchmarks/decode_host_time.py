"""Where a decode call's time goes, ours against SDPA's backends, on the bench's decode shape.

For each implementation: the host time of one call (enqueue only: many calls back to back without a
synchronization, averaged), the time the bench records (CUDA events around one call after a
synchronization, so a call whose host work outlasts an idle GPU pays it), and the device time of its
kernels (torch.profiler). Needs a CUDA build in build/ (`flash-attn-kernel build`).
  usage: python3 benchmarks/decode_host_time.py [--batch 64 --cache 8192 --heads 32:8 --hdim 128 --page 256]
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from flash_attn_kernel import bench


def host_us(call, n: int = 200) -> float:
    for _ in range(10):
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return host


def event_us(call, n: int = 50) -> float:
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        times.append(bench._time_call(call, cuda=True) * 1e3)
    return statistics.median(times)


def device_us(call, n: int = 20) -> float:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            call()
        torch.cuda.synchronize()
    total = sum(e.device_time_total for e in prof.key_averages())
    return total / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cache", type=int, default=8192)
    parser.add_argument("--heads", default="32:8")
    parser.add_argument("--hdim", type=int, default=128)
    parser.add_argument("--page", type=int, default=256)
    args = parser.parse_args()
    hq, hkv = (int(x) for x in args.heads.split(":"))
    point = bench.Point("decode", "bf16", args.batch, 1, args.cache, hq, hkv, args.hdim, True, args.page)
    kernel = bench._load_kernel(Path.cwd(), "cuda")
    q, cache = bench._decode_inputs(point, "cuda", torch.bfloat16)
    impls = {"ours": bench._ours_decode(kernel)(q, cache)}
    # The compiled op alone, without the Python wrapper (flash_attn_with_kvcache's checks and views).
    ops = kernel.interface.ops
    scale = args.hdim ** -0.5
    impls["ours (op)"] = lambda: ops.fwd_kvcache(q, cache.k_pages, cache.v_pages, cache.seqlens, None, None,
                                                 cache.block_table, None, None, scale, True, -1, -1, 0.0, 0)
    for name in ("sdpa-cudnn", "sdpa-flash"):
        impls[name] = bench._sdpa_decode(name)(q, cache)
    print(f"decode batch {args.batch} cache {args.cache} heads {args.heads} hdim {args.hdim} page {args.page} "
          f"({torch.cuda.get_device_name()})")
    print(f"{'impl':12} {'host us':>9} {'event us':>9} {'device us':>10}")
    for name, call in impls.items():
        print(f"{name:12} {host_us(call):9.1f} {event_us(call):9.1f} {device_us(call):10.1f}")


if __name__ == "__main__":
    main()
