"""The `flash-attn-kernel` command: one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import PipelineError

# (subcommand, module in this package, one-line help). Each module defines
# `add_arguments(parser)` and `run(args) -> int`; modules are imported only when
# their subcommand runs, so `--help` stays fast and torch is loaded only when needed.
COMMANDS: list[tuple[str, str, str]] = [
    ("variants", "plan", "list the build variants build.toml implies and which this machine can build"),
    ("build", "compile", "build variants into build/<variant>/ and check them"),
    ("check", "check", "check existing builds: ABI, stable-ABI symbols, import through kernels, digest"),
    ("publish", "publish", "publish verified builds to the Hub or the embedded local repository"),
    ("bench", "bench", "benchmark against the peers on this machine and record results"),
    ("docs", "comparison", "write docs/attention-comparison.md from the recorded benchmark results"),
    ("main", "mainjob", "build for this machine, verify, publish locally and load back through kernels"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flash-attn-kernel", description=__doc__)
    parser.add_argument("--project", default=".", help="kernel source directory holding build.toml (default: .)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        _stage(module).add_arguments(p)
    return parser


def _stage(module: str):
    return importlib.import_module(f"flash_attn_kernel.{module}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by stages that write results
    try:
        return int(_stage(args._module).run(args) or 0)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
