"""Which build variants build.toml and the support policy imply, and which this machine can build.

`flash-attn-kernel variants` prints the matrix; `host_variants()` is what `build` builds
by default. Variant names are exactly kernel-builder's, so the `kernels` loader selects them.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import PipelineError

# Support policy: the torch minors we build, and the CUDA toolkits each torch release
# ships builds for (PyTorch's release matrix, as kernel-builder's build-variants.json uses it).
TORCH_VERSIONS: tuple[tuple[int, int], ...] = ((2, 11), (2, 12), (2, 13), (2, 14), (2, 15))
CUDA_TOOLKITS: tuple[tuple[int, int], ...] = ((12, 6), (12, 8), (13, 0), (13, 2))
TORCH_CUDA: dict[tuple[int, int], tuple[tuple[int, int], ...]] = {
    (2, 11): ((12, 6), (12, 8), (13, 0)),
    (2, 12): ((12, 6), (12, 8), (13, 0), (13, 2)),
    (2, 13): ((12, 6), (12, 8), (13, 0), (13, 2)),
    (2, 14): ((12, 6), (13, 0), (13, 2)),
    (2, 15): ((12, 6), (13, 0), (13, 2)),
}

# Default kernel archs per nvcc version (kernel-builder's CUDA_DEFAULT_KERNEL_ARCHS, +PTX
# stripped): build.toml's cuda-capabilities are loosely intersected with these.
_DEFAULT_ARCHS: tuple[tuple[tuple[int, int], tuple[str, ...]], ...] = (
    ((13, 0), ("7.5", "8.0", "8.6", "8.7", "8.9", "9.0", "10.0", "11.0", "12.0", "12.1")),
    ((12, 8), ("7.0", "7.2", "7.5", "8.0", "8.6", "8.7", "8.9", "9.0", "10.0", "10.1", "12.0")),
    ((0, 0), ("7.0", "7.2", "7.5", "8.0", "8.6", "8.7", "8.9", "9.0")),
)

HOST_CPU = "x86_64"
HOST_OS = "linux"

# torch<MAJOR><MINOR>-cxx11-<compute>-<cpu>-<os>, e.g. torch213-cxx11-cpu-x86_64-linux:
# MAJOR is one digit, MINOR the digits after it; compute is `cpu` or cu<MAJOR><MINOR> with a
# one-digit CUDA minor (cu126 = CUDA 12.6, cu130 = 13.0); cxx11 is the C++11 ABI tag.
_TORCH_RE = re.compile(
    r"^torch(?P<tmaj>\d)(?P<tmin>\d+)-cxx11-(?P<compute>cpu|cu\d{2}\d)-(?P<cpu>x86_64|aarch64)-(?P<os>linux)$"
)
# torch-stable-abi<MAJOR><MINOR>-<compute>-<cpu>-<os>, e.g. torch-stable-abi211-cu130-x86_64-linux:
# built against torch's stable ABI targeting MAJOR.MINOR, loads on every torch >= that version.
_STABLE_RE = re.compile(
    r"^torch-stable-abi(?P<tmaj>\d)(?P<tmin>\d+)-(?P<compute>cpu|cu\d{2}\d)-(?P<cpu>x86_64|aarch64)-(?P<os>linux)$"
)


@dataclass(frozen=True)
class Variant:
    """One ABI variant: a directory name under build/ that the `kernels` loader understands.

    `torch` is the torch minor for full-ABI variants and the stable-ABI floor otherwise;
    `cuda` is the toolkit (None for CPU).
    """

    torch: tuple[int, int]
    stable_abi: bool
    backend: str
    cuda: tuple[int, int] | None = None
    cpu: str = HOST_CPU
    os: str = HOST_OS

    @classmethod
    def parse(cls, name: str) -> "Variant":
        """Parse a variant directory name; raises ValueError for anything else."""
        m = _TORCH_RE.match(name) or _STABLE_RE.match(name)
        if m is None:
            raise ValueError(
                f"variant name {name!r} is not torch<MM>-cxx11-<cpu|cuXYZ>-<cpu>-linux "
                "or torch-stable-abi<MM>-<cpu|cuXYZ>-<cpu>-linux"
            )
        compute = m["compute"]
        cuda = None if compute == "cpu" else (int(compute[2:4]), int(compute[4:]))
        return cls(
            torch=(int(m["tmaj"]), int(m["tmin"])),
            stable_abi=name.startswith("torch-stable-abi"),
            backend="cpu" if cuda is None else "cuda",
            cuda=cuda,
            cpu=m["cpu"],
            os=m["os"],
        )

    @property
    def compute(self) -> str:
        """`cpu` or `cu<MAJOR><MINOR>`."""
        return "cpu" if self.cuda is None else f"cu{self.cuda[0]}{self.cuda[1]}"

    @property
    def torch_str(self) -> str:
        """The torch version as `2.13`."""
        return f"{self.torch[0]}.{self.torch[1]}"

    @property
    def cuda_str(self) -> str | None:
        """The CUDA toolkit as `13.0`, or None for CPU."""
        return None if self.cuda is None else f"{self.cuda[0]}.{self.cuda[1]}"

    def __str__(self) -> str:
        torch = f"{self.torch[0]}{self.torch[1]}"
        if self.stable_abi:
            return f"torch-stable-abi{torch}-{self.compute}-{self.cpu}-{self.os}"
        return f"torch{torch}-cxx11-{self.compute}-{self.cpu}-{self.os}"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def default_archs(cuda: tuple[int, int]) -> tuple[str, ...]:
    """kernel-builder's default kernel archs for an nvcc version (+PTX stripped)."""
    for floor, archs in _DEFAULT_ARCHS:
        if cuda >= floor:
            return archs
    raise AssertionError("the last entry of _DEFAULT_ARCHS matches every version")


def intersect_archs(capabilities: Sequence[str], cuda: tuple[int, int]) -> tuple[str, ...]:
    """kernel-builder's loose intersection of cuda-capabilities with a toolkit's archs.

    For each arch the toolkit builds by default, take the highest capability with the same
    major version that is not above it; `X.Ya`/`X.Yf` capabilities are kept when X.Y is one
    of the toolkit's archs. The result is sorted by version.
    """
    targets = default_archs(cuda)
    plain = [c for c in capabilities if c[-1].isdigit()]
    suffixed = [c for c in capabilities if not c[-1].isdigit()]
    chosen: set[str] = set()
    for target in targets:
        t = _version_tuple(target)
        candidates = [c for c in plain if _version_tuple(c)[0] == t[0] and _version_tuple(c) <= t]
        if candidates:
            chosen.add(max(candidates, key=_version_tuple))
    chosen.update(c for c in suffixed if c[:-1] in targets)
    return tuple(sorted(chosen, key=lambda a: (_version_tuple(a.rstrip("af")), a)))


def _in_bounds(version: tuple[int, int], minver: str | None, maxver: str | None) -> bool:
    lo = _version_tuple(minver) if minver else (0,)
    hi = _version_tuple(maxver) if maxver else (99, 9)
    return lo <= version <= hi


@dataclass(frozen=True)
class PlannedVariant:
    """A variant build.toml implies, with its CUDA archs (union over kernels, like metadata.json)."""

    variant: Variant
    archs: tuple[str, ...] = ()

    def kernel_archs(self, project) -> dict[str, tuple[str, ...]]:
        """Per CUDA kernel section: the archs it is compiled for in this variant (skipped ones absent)."""
        if self.variant.cuda is None:
            return {}
        out = {}
        for k in project.kernels_for("cuda"):
            if k.cuda_minver and self.variant.cuda < _version_tuple(k.cuda_minver):
                continue
            caps = k.cuda_capabilities if k.cuda_capabilities is not None else default_archs(self.variant.cuda)
            archs = intersect_archs(caps, self.variant.cuda)
            if not archs:
                raise PipelineError(
                    f"kernel {k.name}: cuda-capabilities {list(caps)} share no arch with CUDA "
                    f"{self.variant.cuda_str}'s {list(default_archs(self.variant.cuda))}",
                    where="build.toml",
                    fix=f"add a capability CUDA {self.variant.cuda_str} supports, or set cuda-minver",
                )
            out[k.name] = _narrowed(archs)
        return out


def _narrowed(archs: tuple[str, ...]) -> tuple[str, ...]:
    """`archs` limited to $FLASH_ATTN_CUDA_ARCHS (e.g. "9.0" or "8.0;9.0"; "9.0" keeps "9.0a") when set.

    For development builds only: compiling one architecture instead of six cuts a CUDA build
    several-fold. metadata.json then lists just those archs, so the build stays honest.
    """
    wanted = os.environ.get("FLASH_ATTN_CUDA_ARCHS")
    if not wanted:
        return archs
    names = {w.strip() for w in wanted.replace(",", ";").split(";")}
    keep = tuple(a for a in archs if a in names or a.rstrip("af") in names)  # "9.0" also keeps "9.0a"
    if not keep:
        raise PipelineError(f"FLASH_ATTN_CUDA_ARCHS={wanted!r} keeps none of {list(archs)}",
                            fix="name archs from that list, or unset FLASH_ATTN_CUDA_ARCHS")
    return keep


def matrix(project) -> list[PlannedVariant]:
    """Every variant build.toml and the support policy imply, sorted by name."""
    torches = [t for t in TORCH_VERSIONS if _in_bounds(t, project.torch_minver, project.torch_maxver)]
    out: list[PlannedVariant] = []
    for backend in project.backends:
        if backend == "cpu":
            out += [PlannedVariant(Variant(torch=t, stable_abi=False, backend="cpu")) for t in torches]
        elif backend == "cuda":
            out += _cuda_variants(project, torches)
        # Other backends (rocm, xpu, metal, ...) are not built by this builder; `variants`
        # reports them through unsupported_backends().
    return sorted(out, key=lambda p: str(p.variant))


def _cuda_variants(project, torches: list[tuple[int, int]]) -> list[PlannedVariant]:
    floor = project.stable_abi_for("cuda")
    out = []
    if floor is not None:
        floor_t = tuple(_version_tuple(floor)[:2])
        # One variant per toolkit that any supported torch >= the floor ships with.
        toolkits = sorted({c for t in torches if t >= floor_t for c in TORCH_CUDA.get(t, ())})
        pairs = [(floor_t, c, True) for c in toolkits]
    else:
        pairs = [(t, c, False) for t in torches for c in TORCH_CUDA.get(t, ())]
    for torch, cuda, stable in pairs:
        if not _in_bounds(cuda, project.cuda_minver, project.cuda_maxver):
            continue
        planned = PlannedVariant(Variant(torch=torch, stable_abi=stable, backend="cuda", cuda=cuda))
        per_kernel = planned.kernel_archs(project)
        archs = sorted({a for v in per_kernel.values() for a in v}, key=lambda a: (_version_tuple(a.rstrip("af")), a))
        out.append(PlannedVariant(planned.variant, tuple(archs)))
    return out


def unsupported_backends(project) -> list[str]:
    """build.toml backends this builder does not compile (kernel-builder's Nix path does)."""
    return [b for b in project.backends if b not in ("cpu", "cuda")]


def select(project, names: Sequence[str] | None) -> list[PlannedVariant]:
    """The planned variants named (the host's, see host_planned, when `names` is None).

    Raises PipelineError for a name that is malformed or not in build.toml's matrix,
    listing the closest valid names.
    """
    planned = matrix(project)
    if names is None:
        return host_planned(project)
    by_name = {str(p.variant): p for p in planned}
    out = []
    for name in names:
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=3, cutoff=0.5)
            try:
                Variant.parse(name)
                why = "is not one of the variants build.toml implies"
            except ValueError as err:
                why = f"is not a variant name ({err})"
            raise PipelineError(
                f"--variant {name!r} {why}",
                where=str(project.root / "build.toml"),
                fix=("did you mean: " + ", ".join(close)) if close else
                "run `flash-attn-kernel variants` to list the valid names",
            )
        out.append(by_name[name])
    return out


def host_planned(project) -> list[PlannedVariant]:
    """The planned variants the host's own torch and nvcc build now (nothing to fetch)."""
    from .toolchain import availability

    return [p for p in matrix(project) if availability(p.variant).host]


def host_variants(project: Path) -> list[Variant]:
    """The variants of the project at `project` that the host's torch and nvcc build now.

    This is what `build` builds by default; variants needing a fetched toolchain are built
    when named (or with --all).
    """
    from .project import load

    return [p.variant for p in host_planned(load(project))]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the matrix as JSON")


def run(args: argparse.Namespace) -> int:
    import json

    from .project import load
    from .toolchain import availability

    project = load(Path(args.project))
    rows = []
    for p in matrix(project):
        a = availability(p.variant)
        rows.append({"variant": str(p.variant), "archs": list(p.archs), "buildable": a.buildable,
                     "default": a.host, "how": a.how})
    skipped = unsupported_backends(project)
    if args.json:
        print(json.dumps({"variants": rows, "unsupported_backends": skipped}, indent=2))
        return 0
    from rich.table import Table

    from .progress import make_console

    table = Table(title=f"{project.name} v{project.version}: build variants",
                  caption="default: built by `build` with no --variant (host toolchain, nothing to fetch)")
    table.add_column("variant", no_wrap=True)
    table.add_column("archs")
    table.add_column("here")
    table.add_column("toolchain / why not")
    for r in rows:
        here = ("yes (default)" if r["default"] else "yes") if r["buildable"] else "[red]no[/]"
        table.add_row(r["variant"], " ".join(r["archs"]) or "-", here, r["how"])
    console = make_console()
    console.print(table)
    if skipped:
        console.print(f"backends not built by this builder (use kernel-builder's Nix path): {', '.join(skipped)}")
    return 0
