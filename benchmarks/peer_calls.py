"""Back-to-back calls of one implementation at one of the bench's points, for a profiler.

Nsight Compute profiles our kernels through the timing harness (ci/gpu-profile.sh); this script gives
it the peers' kernels on the same card and shape, so that their stall mix, instruction counts and
issue rates can be read next to ours:
  usage: PYTHONPATH=$PWD python3 benchmarks/peer_calls.py --impl sdpa-flash --op bwd --hdim 128 --seqlen 16384
         COMMAND='python3 benchmarks/peer_calls.py --impl sdpa-flash --op bwd' KERNEL=flash_bwd_dq_dk_dv \
           LAUNCH_SKIP=2 NAME=flash-bwd-d128 bash ci/gpu-profile.sh
Inputs are the bench's (fresh random bf16, batch * seqlen = --tokens, heads * hdim = 2048); --impl ours
needs a build in build/ (`flash-attn-kernel build`).
"""

import argparse
from pathlib import Path

import torch

from flash_attn_kernel import bench

HIDDEN = 2048  # heads * hdim, as the bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", default="sdpa-flash",
                        help=f"'ours' or a bench peer ({', '.join(bench.CUDA_PEERS)}; on CPU {', '.join(bench.CPU_PEERS)})")
    parser.add_argument("--op", choices=("fwd", "bwd", "fwdbwd"), default="bwd")
    parser.add_argument("--hdim", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=16384, help="batch * seqlen (default: the bench's 16384)")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--calls", type=int, default=5, help="calls after the inputs are made (default 5)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
    if HIDDEN % args.hdim or args.tokens % args.seqlen:
        parser.error(f"--hdim must divide {HIDDEN} and --seqlen must divide --tokens ({args.tokens})")
    kernel = bench._load_kernel(Path.cwd(), args.device) if args.impl == "ours" else None
    impls = bench.implementations(kernel, args.device, args.op, "ours", None)
    if args.impl not in impls:
        parser.error(f"--impl {args.impl!r} is not one of {', '.join(sorted(impls))} on {args.device}")
    heads = HIDDEN // args.hdim
    point = bench.Point(args.op, "bf16", args.tokens // args.seqlen, args.seqlen, args.seqlen, heads, heads,
                        args.hdim, args.causal)
    step = bench._prepare(impls[args.impl], point, args.device, torch.bfloat16)
    for _ in range(args.calls):
        step()
    if args.device == "cuda":
        torch.cuda.synchronize()
    print(f"{args.calls} calls of {args.impl}: {point.describe()}")


if __name__ == "__main__":
    main()
