"""`flash-attn-kernel check`: verify build variants, ours or any kernel-builder output.

Per variant: metadata.json parses with the loader's parser and names the module; every
native library passes kernel-abi-check (manylinux_2_28, Python 3.9 abi3); stable-ABI
variants reference no torch C++ symbol outside torch::stable; the variant imports through
`kernels.get_local_kernel` (in a subprocess, when the running torch can load it); the files
match the digest in metadata.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PipelineError

MANYLINUX = "manylinux_2_28"
PYTHON_ABI = "3.9"
# Levels tried, oldest first, to report the best one a library reaches.
MANYLINUX_LEVELS = ("manylinux_2_17", "manylinux_2_28", "manylinux_2_31", "manylinux_2_34", "manylinux_2_35",
                    "manylinux_2_36", "manylinux_2_39")
# C++ namespaces whose symbols break torch's stable ABI (kernel-abi-check's rule);
# torch::stable:: is the stable API itself.
_UNSTABLE_NAMESPACES = ("c10::", "at::", "torch::")
_SPECIAL_PREFIXES = ("typeinfo name for ", "typeinfo for ", "vtable for ", "VTT for ", "guard variable for ",
                     "construction vtable for ", "non-virtual thunk to ", "virtual thunk to ")


@dataclass
class CheckResult:
    """One check on one variant: passed (True), failed (False) or skipped (None), and why."""

    name: str
    passed: bool | None
    detail: str = ""

    def summary(self) -> str:
        state = {True: "ok", False: "FAILED", None: "skipped"}[self.passed]
        return f"{self.name}: {state}" + (f": {self.detail}" if self.detail else "")


@dataclass
class VariantReport:
    """All checks on one variant directory, plus the best manylinux level its libraries reach."""

    variant: str
    path: Path
    results: list[CheckResult] = field(default_factory=list)
    manylinux: str | None = None

    @property
    def ok(self) -> bool:
        return all(r.passed is not False for r in self.results)

    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.passed is False]


def check_variant(path: Path, *, variant_name: str | None = None, import_check: bool = True,
                  manylinux: str | None = MANYLINUX) -> VariantReport:
    """Run every check on one variant directory.

    `variant_name` is the variant this directory will be installed as (it may sit in a
    staging directory); by default the directory name. `manylinux` is the level the native
    libraries must reach (redistributable builds: manylinux_2_28); None only reports the
    level reached, for local builds made against a newer glibc.
    """
    path = Path(path)
    name = variant_name or path.name
    report = VariantReport(variant=name, path=path)
    meta = _check_metadata(path, report)
    libs = sorted(p for p in path.rglob("*") if p.suffix in (".so", ".pyd") or p.name.endswith(".abi3.so"))
    if meta is not None:
        report.results.append(_check_module(path, meta, libs))
    report.results.append(_check_abi(libs, report, manylinux))
    if name.startswith("torch-stable-abi"):
        report.results.append(_check_stable_abi(libs))
    if import_check:
        report.results.append(_check_import(path, name))
    if meta is not None:
        report.results.append(_check_digest(path, meta))
    return report


def _check_metadata(path: Path, report: VariantReport):
    from kernels._rust import Metadata

    try:
        meta = Metadata.read_from_file(path / "metadata.json")
    except (OSError, ValueError) as err:
        report.results.append(CheckResult("metadata", False, f"{path / 'metadata.json'}: {err}"))
        return None
    report.results.append(CheckResult("metadata", True, f"id {meta.id}, version {meta.version}"))
    return meta


def _check_module(path: Path, meta, libs: list[Path]) -> CheckResult:
    # Current builds are flat; builds before mid-2026 kept the package in <python_name>/.
    package = next((d for d in (path, path / meta.name.python_name) if (d / "__init__.py").is_file()), None)
    if package is None:
        return CheckResult("layout", False, f"no __init__.py in {path}")
    if not (package / "_ops.py").is_file():
        return CheckResult("layout", False, f"no _ops.py in {package}")
    expected = package / f"{meta.id}.abi3.so"
    if libs and expected not in libs:
        return CheckResult("layout", False, f"expected module {expected.name} (metadata id), found {[l.name for l in libs]}")
    return CheckResult("layout", True)


def _check_abi(libs: list[Path], report: VariantReport, required: str | None) -> CheckResult:
    from kernel_abi_check import ObjectFile

    problems = []
    levels = []
    for lib in libs:
        obj = ObjectFile(str(lib))
        if required is not None:
            for v in obj.check_manylinux(required):
                problems.append(f"{lib.name}: {v.name} needs {v.dep} {v.version} (not allowed in {required})")
        for v in obj.check_python_abi(PYTHON_ABI):
            added = getattr(v, "version_added", None)
            problems.append(f"{lib.name}: Python symbol {v.name} " +
                            (f"added in {added} (> {PYTHON_ABI})" if added else "is not in the abi3 set"))
        levels.append(next((lvl for lvl in MANYLINUX_LEVELS if not obj.check_manylinux(lvl)), None))
    if levels:
        known = [lvl for lvl in levels if lvl is not None]
        report.manylinux = max(known, key=MANYLINUX_LEVELS.index) if len(known) == len(levels) else None
    if problems:
        return CheckResult("abi", False, "; ".join(problems[:10]) + (f" (+{len(problems) - 10} more)" if len(problems) > 10 else ""))
    if required is None:
        level = report.manylinux
        redistributable = level is not None and MANYLINUX_LEVELS.index(level) <= MANYLINUX_LEVELS.index(MANYLINUX)
        note = "" if redistributable else f"; a local build, not redistributable (the Hub needs {MANYLINUX})"
        return CheckResult("abi", True, f"abi3 {PYTHON_ABI}, reaches {level or 'no listed manylinux level'}{note}")
    return CheckResult("abi", True, f"{required}, abi3 {PYTHON_ABI}")


def undefined_symbols(lib: Path) -> list[str]:
    """Demangled undefined dynamic symbols of a shared library (`nm -DC --undefined-only`)."""
    nm = shutil.which("nm")
    if nm is None:
        raise PipelineError("`nm` (binutils) is needed for the stable-ABI check and is not on PATH",
                            fix="install binutils")
    out = subprocess.run([nm, "-D", "-C", "--undefined-only", str(lib)], capture_output=True, text=True, check=True)
    names = []
    for line in out.stdout.splitlines():
        parts = line.strip().split(None, 1)  # "U name[@VERSION]" (undefined lines have no address)
        if len(parts) == 2:
            names.append(re.sub(r"@@?[\w.]+$", "", parts[1]))
    return names


def qualified_name(demangled: str) -> str:
    """The qualified entity a demangled symbol names, without return type or special prefix."""
    for prefix in _SPECIAL_PREFIXES:
        if demangled.startswith(prefix):
            return demangled[len(prefix):]
    depth = 0
    last_space = -1
    for i, ch in enumerate(demangled):
        if ch in "<(":
            if ch == "(" and depth == 0:
                break
            depth += 1
        elif ch in ">)":
            depth -= 1
        elif ch == " " and depth == 0:
            last_space = i  # a template function's return type precedes its name
    return demangled[last_space + 1:]


def stable_abi_violations(lib: Path) -> list[str]:
    """Undefined torch C++ symbols (c10::, at::, torch:: other than torch::stable::) of `lib`."""
    bad = []
    for sym in undefined_symbols(lib):
        name = qualified_name(sym)
        if name.startswith(_UNSTABLE_NAMESPACES) and not name.startswith("torch::stable::"):
            bad.append(sym)
    return bad


def _check_stable_abi(libs: list[Path]) -> CheckResult:
    problems = [f"{lib.name} references {sym}" for lib in libs for sym in stable_abi_violations(lib)]
    if problems:
        return CheckResult("stable-abi", False, "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""))
    return CheckResult("stable-abi", True, "only C shims and torch::stable")


def _running_torch():
    from .toolchain import host_torch

    return host_torch()


def _check_import(path: Path, name: str) -> CheckResult:
    from .plan import Variant

    torch = _running_torch()
    try:
        variant = Variant.parse(name)
    except ValueError:
        return CheckResult("import", None, f"not a variant name this checker understands: {name}")
    if torch is None:
        return CheckResult("import", None, f"needs torch {variant.torch_str}; none installed")
    loads = torch.minor >= variant.torch if variant.stable_abi else torch.minor == variant.torch
    if not loads:
        want = f">= {variant.torch_str}" if variant.stable_abi else variant.torch_str
        return CheckResult("import", None, f"needs torch {want} (running {torch.version})")
    if variant.cuda is not None and torch.cuda is None:
        return CheckResult("import", None, f"needs a CUDA build of torch (running {torch.version})")
    # A fresh process: a module loaded here could not be reloaded after a rebuild, and a
    # crash in static initializers must not take the builder down.
    code = (
        "import sys, json, pathlib, torch, kernels\n"
        "m = kernels.get_local_kernel(pathlib.Path(sys.argv[1]))\n"
        "from importlib import import_module\n"
        "ops = import_module(m.__name__ + '._ops')\n"
        "print(json.dumps({'module': m.__name__, 'namespace': ops.ops.name}))\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    if proc.returncode != 0:
        err = [l for l in proc.stderr.strip().splitlines() if l.strip()][-3:]
        return CheckResult("import", False, "kernels.get_local_kernel failed: " + " | ".join(err))
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return CheckResult("import", True, f"module {info['module']}")


def _check_digest(path: Path, meta) -> CheckResult:
    from kernels._rust import Digest, DigestValidationError

    if meta.digest is None:
        return CheckResult("digest", None, "metadata.json has no digest")
    actual = Digest.hash_variant(meta.digest.algorithm, path)
    try:
        meta.digest.validate(actual)
    except DigestValidationError as err:
        violations = getattr(err, "violations", None) or [err]
        return CheckResult("digest", False, "; ".join(str(v) for v in violations[:5]))
    return CheckResult("digest", True, f"{len(actual.files)} files")


def find_variants(directory: Path) -> list[Path]:
    """Variant directories under `directory`: itself, its children, or build/'s children."""
    directory = Path(directory)
    if (directory / "metadata.json").is_file():
        return [directory]
    for base in (directory, directory / "build"):
        found = sorted(p for p in base.glob("*/metadata.json") if not p.parent.name.startswith("."))
        if found:
            return [p.parent for p in found]
    return []


def print_reports(reports: list[VariantReport], console=None) -> None:
    """A table: one row per variant, one column per check."""
    from rich.table import Table

    from .progress import make_console

    console = console or make_console()
    names = []
    for r in reports:
        names += [c.name for c in r.results if c.name not in names]
    table = Table(title="checks")
    table.add_column("variant", no_wrap=True)
    for n in names:
        table.add_column(n)
    table.add_column("manylinux")
    for r in reports:
        cells = []
        by_name = {c.name: c for c in r.results}
        for n in names:
            c = by_name.get(n)
            cells.append("-" if c is None else {True: "[green]ok[/]", False: "[red]FAIL[/]", None: "[yellow]skip[/]"}[c.passed])
        table.add_row(r.variant, *cells, (r.manylinux or "-").replace("manylinux_", ""))
    console.print(table)
    for r in reports:
        for c in r.results:
            if c.passed is not True and c.detail:
                console.print(f"{r.variant}: {c.summary()}", markup=False, highlight=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", nargs="?", default=None,
                        help="a variant directory, a build/ directory or a project (default: <project>/build)")
    parser.add_argument("--no-import", action="store_true", help="skip the import check")
    parser.add_argument("--manylinux", default=MANYLINUX, metavar="LEVEL",
                        help=f"manylinux level the libraries must reach (default: {MANYLINUX}; 'any' only reports it)")


def run(args: argparse.Namespace) -> int:
    directory = Path(args.dir) if args.dir else Path(args.project) / "build"
    variants = find_variants(directory)
    if not variants:
        raise PipelineError(f"no build variants (directories with metadata.json) in {directory}",
                            where=str(directory), fix="run `flash-attn-kernel build` first, or pass the build directory")
    required = None if args.manylinux == "any" else args.manylinux
    reports = [check_variant(v, import_check=not args.no_import, manylinux=required) for v in variants]
    print_reports(reports)
    return 0 if all(r.ok for r in reports) else 1
