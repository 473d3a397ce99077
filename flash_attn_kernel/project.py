"""The kernel project: build.toml read once, validated by `kernels`, as plain values.

build.toml is validated with `kernels._rust.Build.open` (the same parser kernel-builder
uses, so a file we accept is one kernel-builder accepts); the fields that parser does not
expose are then read with tomllib. Everything else in the pipeline reads a `Project`.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PipelineError

# File name suffixes that are compiled; everything else listed in `src` is a header.
CXX_SUFFIXES = (".cpp", ".cc", ".cxx", ".c")
CUDA_SUFFIXES = (".cu",)


@dataclass(frozen=True)
class KernelSpec:
    """One `[kernel.<name>]` section: sources compiled without torch for one backend."""

    name: str
    backend: str
    src: tuple[str, ...]
    include: tuple[str, ...] = ()
    depends: tuple[str, ...] = ()
    cuda_capabilities: tuple[str, ...] | None = None
    cuda_flags: tuple[str, ...] = ()
    cxx_flags: tuple[str, ...] = ()
    cuda_minver: str | None = None

    def compiled_sources(self) -> tuple[str, ...]:
        """The translation units of this kernel (headers dropped)."""
        return tuple(s for s in self.src if s.endswith(CXX_SUFFIXES + CUDA_SUFFIXES))


@dataclass(frozen=True)
class Project:
    """A kernel source tree: build.toml's settings plus where the sources live."""

    root: Path
    name: str
    version: int
    license: str
    backends: tuple[str, ...]
    torch_src: tuple[str, ...]
    torch_include: tuple[str, ...] = ()
    torch_cxx_flags: tuple[str, ...] = ()
    torch_minver: str | None = None
    torch_maxver: str | None = None
    pyext: tuple[str, ...] = ("py", "pyi")
    # backend -> stable-ABI floor ("2.11"); backends missing here use torch's full ABI.
    stable_abi: dict[str, str] = field(default_factory=dict)
    cuda_minver: str | None = None
    cuda_maxver: str | None = None
    upstream: str | None = None
    source: str | None = None
    python_depends: tuple[str, ...] = ()
    # backend -> extra python-depends from [general.<backend>]
    backend_python_depends: dict[str, tuple[str, ...]] = field(default_factory=dict)
    kernel_depends: tuple[dict, ...] = ()
    backend_kernel_depends: dict[str, tuple[dict, ...]] = field(default_factory=dict)
    kernels: tuple[KernelSpec, ...] = ()

    @property
    def python_name(self) -> str:
        """The package name: build.toml's name with '-' replaced by '_'."""
        return self.name.replace("-", "_")

    @property
    def package_dir(self) -> Path:
        """`torch-ext/<python_name>/`, the Python package shipped in every variant."""
        return self.root / "torch-ext" / self.python_name

    def kernels_for(self, backend: str) -> tuple[KernelSpec, ...]:
        """The `[kernel.*]` sections of one backend, in build.toml order."""
        return tuple(k for k in self.kernels if k.backend == backend)

    def stable_abi_for(self, backend: str) -> str | None:
        """The stable-ABI floor ("2.11") for a backend, or None for the full ABI."""
        return self.stable_abi.get(backend)

    def python_depends_for(self, backend: str) -> list[str]:
        """General plus backend python-depends, as metadata.json lists them."""
        return list(self.python_depends) + list(self.backend_python_depends.get(backend, ()))

    def kernel_depends_for(self, backend: str) -> list[dict]:
        """General plus backend kernel-depends, as metadata.json lists them."""
        return list(self.kernel_depends) + list(self.backend_kernel_depends.get(backend, ()))


def load(root: Path) -> Project:
    """Read and validate `<root>/build.toml`.

    Raises PipelineError with kernels' own message when the file is missing or invalid.
    """
    root = Path(root).resolve()
    toml_path = root / "build.toml"
    if not toml_path.is_file():
        raise PipelineError(
            f"no build.toml in project directory {root}",
            where=str(toml_path),
            fix="pass --project <dir> pointing at the kernel source tree (the directory holding build.toml)",
        )
    from kernels._rust import Build  # heavy: a compiled extension

    try:
        Build.open(root)
    except ValueError as err:
        raise PipelineError(
            f"build.toml is not valid for kernel-builder: {err}",
            where=str(toml_path),
            fix="correct build.toml (schema: kernel-builder edition 5)",
        ) from None
    data = tomllib.loads(toml_path.read_text())
    if "torch" not in data:
        raise PipelineError(
            "build.toml has no [torch] section; this builder compiles torch extensions only",
            where=str(toml_path),
            fix="add a [torch] section with `src` (noarch and tvm-ffi kernels are built with kernel-builder)",
        )
    general = data["general"]
    torch = data["torch"]
    backends = tuple(general["backends"])
    stable = torch.get("stable-abi")
    if isinstance(stable, str):
        stable_abi = {b: stable for b in backends}
    else:
        # Table form: only backends that are built count (kernel-builder's TorchAbi::for_backend).
        stable_abi = {b: v for b, v in (stable or {}).items() if b in backends}
    kernels = []
    for kname, k in data.get("kernel", {}).items():
        caps = k.get("cuda-capabilities")
        kernels.append(
            KernelSpec(
                name=kname,
                backend=k["backend"],
                src=tuple(k["src"]),
                include=tuple(k.get("include", ())),
                depends=tuple(k.get("depends", ())),
                cuda_capabilities=tuple(caps) if caps is not None else None,
                cuda_flags=tuple(k.get("cuda-flags", ())),
                cxx_flags=tuple(k.get("cxx-flags", ())),
                cuda_minver=k.get("cuda-minver"),
            )
        )
    backend_py: dict[str, tuple[str, ...]] = {}
    backend_kd: dict[str, tuple[dict, ...]] = {}
    for b in ("cuda", "xpu", "neuron", "tpu"):
        section = general.get(b, {})
        if section.get("python-depends"):
            backend_py[b] = tuple(section["python-depends"])
        if section.get("kernel-depends"):
            backend_kd[b] = tuple(section["kernel-depends"])
    cuda = general.get("cuda", {})
    return Project(
        root=root,
        name=general["name"],
        version=int(general["version"]),
        license=general["license"],
        backends=backends,
        torch_src=tuple(torch["src"]),
        torch_include=tuple(torch.get("include", ())),
        torch_cxx_flags=tuple(torch.get("cxx-flags", ())),
        torch_minver=torch.get("minver"),
        torch_maxver=torch.get("maxver"),
        pyext=tuple(torch.get("pyext", ("py", "pyi"))),
        stable_abi=stable_abi,
        cuda_minver=cuda.get("minver"),
        cuda_maxver=cuda.get("maxver"),
        upstream=general.get("upstream"),
        source=general.get("source"),
        python_depends=tuple(general.get("python-depends", ())),
        backend_python_depends=backend_py,
        kernel_depends=tuple(general.get("kernel-depends", ())),
        backend_kernel_depends=backend_kd,
        kernels=tuple(kernels),
    )


@dataclass(frozen=True)
class SourceState:
    """Where the sources come from: the uid in op namespaces plus git provenance."""

    uid: str
    commit: str | None
    dirty: bool


def source_state(root: Path) -> SourceState:
    """The uid kernel-builder's create-pyproject uses: 7 hex of HEAD's tree id, `_dirty` if changed.

    Untracked (not ignored) files count as changes too: a new source file that is not
    committed yet changes what gets built, so the build must not claim the clean tree id.
    Without git the uid is random, so two source trees never share an op namespace; it is
    kept in `_build/uid` so rebuilds of the same tree stay incremental.
    """
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], check=True, capture_output=True, text=True
        ).stdout.strip()

    try:
        tree = git("rev-parse", "HEAD^{tree}")
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.CalledProcessError):
        saved = root / "_build" / "uid"
        if saved.is_file() and re.fullmatch(r"[a-z2-7]{7}", saved.read_text().strip()):
            return SourceState(uid=saved.read_text().strip(), commit=None, dirty=False)
        uid = _random_uid()
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(uid + "\n")
        return SourceState(uid=uid, commit=None, dirty=False)
    return SourceState(uid=tree[:7] + ("_dirty" if dirty else ""), commit=commit, dirty=dirty)


def _random_uid() -> str:
    # Lowercase base32 letters and digits: a valid identifier fragment, like kernel-builder's.
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    return "".join(secrets.choice(alphabet) for _ in range(7))


def ops_name(project: Project, backend: str, uid: str) -> str:
    """The op namespace, module name and metadata id: `_<python_name>_<backend>_<uid>`."""
    return f"_{project.python_name}_{backend}_{uid}"
