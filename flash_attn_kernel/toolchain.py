"""Toolchains per variant: torch headers/libraries and nvcc, from the host or the package registry.

The host's toolchain is used when it matches the variant. Otherwise the pieces are
assembled from wheels a user's pip can already fetch -- the variant's torch wheel (only
include/ and the libraries we link are kept) and, for CUDA 13.x, NVIDIA's nvcc/nvvm/crt/
cccl/runtime wheels -- unpacked once into a cache ($FLASH_ATTN_KERNEL_CACHE, default
~/.cache/flash-attn-kernel) and reused.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import PipelineError

# torch libraries a binding links against. Stable-ABI bindings only call C shims that live
# in libtorch_cpu, so a CPU torch wheel serves CUDA stable-ABI builds as well.
TORCH_LINK_LIBS = ("libtorch.so", "libtorch_cpu.so", "libc10.so")

# NVIDIA's CUDA 13 compiler wheels (unsuffixed names); together they form a toolkit root
# like /usr/local/cuda. CUDA 12 wheels carry no nvcc driver, so 12.x cannot be assembled.
CUDA13_WHEELS = ("nvidia-cuda-nvcc", "nvidia-cuda-crt", "nvidia-nvvm", "nvidia-cuda-cccl", "nvidia-cuda-runtime")


@dataclass(frozen=True)
class TorchToolchain:
    """A torch installation to compile a binding against: headers and the libraries to link."""

    version: str  # full version, e.g. "2.13.0+cpu"
    root: Path  # the `torch` package directory
    cuda: str | None  # torch.version.cuda of that build
    source: str  # "host" or "registry"

    @property
    def minor(self) -> tuple[int, int]:
        """(major, minor) of this torch."""
        major, minor = self.version.split(".")[:2]
        return int(major), int(minor)

    @property
    def include_dirs(self) -> list[Path]:
        """Include directories torch's own CMake config exports."""
        return [self.root / "include", self.root / "include" / "torch" / "csrc" / "api" / "include"]

    @property
    def libraries(self) -> list[Path]:
        """The torch libraries a binding links (resolved at load time from the imported torch)."""
        return [self.root / "lib" / name for name in TORCH_LINK_LIBS]


@dataclass(frozen=True)
class CudaToolchain:
    """A CUDA toolkit root (bin/nvcc, include/, lib/) and its version."""

    version: tuple[int, int]
    root: Path
    source: str  # "host" or "registry"

    @property
    def nvcc(self) -> Path:
        return self.root / "bin" / "nvcc"


@dataclass(frozen=True)
class Toolchain:
    """What one variant is compiled with."""

    torch: TorchToolchain
    cuda: CudaToolchain | None = None


@dataclass(frozen=True)
class Availability:
    """Whether this machine can build a variant now, and how (or why not).

    `host` is True when the host's own torch and nvcc serve it: nothing to fetch.
    """

    buildable: bool
    how: str
    host: bool = False


def cache_dir() -> Path:
    """Where assembled toolchains are unpacked: $FLASH_ATTN_KERNEL_CACHE or ~/.cache/flash-attn-kernel."""
    env = os.environ.get("FLASH_ATTN_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "flash-attn-kernel"


def host_torch() -> TorchToolchain | None:
    """The torch installed in this Python, found without importing it (import takes seconds)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    return _torch_at(root, "host")


def _torch_at(root: Path, source: str) -> TorchToolchain | None:
    version_py = root / "version.py"
    if not version_py.is_file() or not (root / "include").is_dir():
        return None
    text = version_py.read_text()
    version = re.search(r"^__version__\s*=\s*'([^']+)'", text, re.M)
    cuda = re.search(r"^cuda(?::[^=]*)?=\s*'([^']+)'", text, re.M)
    if version is None:
        return None
    return TorchToolchain(version=version.group(1), root=root, cuda=cuda.group(1) if cuda else None, source=source)


def host_cuda() -> CudaToolchain | None:
    """The host CUDA toolkit: $CUDA_HOME, else /usr/local/cuda, else the nvcc on PATH."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]))
    candidates.append(Path("/usr/local/cuda"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        # /usr/local/bin/nvcc may be a wrapper script; the toolkit root is only trusted
        # when bin/nvcc sits inside it next to include/.
        candidates.append(Path(nvcc).resolve().parent.parent)
    for root in candidates:
        version = nvcc_version(root / "bin" / "nvcc")
        if version is not None and (root / "include" / "cuda_runtime.h").is_file():
            return CudaToolchain(version=version, root=root.resolve(), source="host")
    return None


def nvcc_version(nvcc: Path) -> tuple[int, int] | None:
    """(major, minor) from `nvcc --version`, or None when there is no working nvcc."""
    if not nvcc.is_file():
        return None
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _cached_torch(minor: tuple[int, int]) -> TorchToolchain | None:
    root = cache_dir() / f"torch-{minor[0]}.{minor[1]}" / "torch"
    if not (root.parent / ".complete").is_file():
        return None
    return _torch_at(root, "registry")


def _cached_cuda(version: tuple[int, int]) -> CudaToolchain | None:
    root = cache_dir() / f"cuda-{version[0]}.{version[1]}"
    if not (root / ".complete").is_file():
        return None
    return CudaToolchain(version=version, root=root, source="registry")


def availability(variant) -> Availability:
    """Whether `variant` can be built here now, with the toolchain it would use or why not.

    Nothing is downloaded; "to fetch" means `build` will fetch and cache it.
    """
    host_t = host_torch()
    if variant.cuda is not None and not variant.stable_abi and not (host_t and _host_serves(host_t, variant)):
        # Full-ABI CUDA bindings link libtorch_cuda/libc10_cuda and include ATen's CUDA
        # headers, which need the CUDA library headers of that exact torch build.
        return Availability(
            False,
            f"needs torch {variant.torch_str} built for CUDA {variant.cuda_str} installed on the host "
            "(full-ABI CUDA bindings are not assembled from wheels)",
        )
    torch_how, torch_host = _torch_plan(variant)
    if variant.cuda is None:
        return Availability(True, torch_how, host=torch_host)
    cuda = variant.cuda
    host = host_cuda()
    if host is not None and host.version == cuda:
        return Availability(True, f"{torch_how}; host nvcc {cuda[0]}.{cuda[1]} ({host.root})", host=torch_host)
    if _cached_cuda(cuda) is not None:
        return Availability(True, f"{torch_how}; nvcc {cuda[0]}.{cuda[1]} assembled from wheels (cached)")
    if cuda[0] >= 13:
        return Availability(True, f"{torch_how}; nvcc {cuda[0]}.{cuda[1]} to assemble from NVIDIA's wheels (cached after)")
    return Availability(
        False,
        f"needs a CUDA {cuda[0]}.{cuda[1]} toolkit on the host (no nvcc driver in the cu12 wheels on the "
        "registry; the release workflow's container has one)",
    )


def _torch_plan(variant) -> tuple[str, bool]:
    want = variant.torch
    host = host_torch()
    if host is not None and _host_serves(host, variant):
        return f"host torch {host.version}", True
    if _cached_torch(want) is not None:
        return f"torch {want[0]}.{want[1]} from the registry (cached)", False
    return f"torch {want[0]}.{want[1]} wheel to fetch from the registry (cached after)", False


def _host_serves(host: TorchToolchain, variant) -> bool:
    # Stable-ABI variants need a torch at or above the floor, of any flavour: with
    # TORCH_TARGET_VERSION its headers emit only floor-level C shim calls. Full-ABI variants
    # need exactly their torch minor, and for CUDA a torch built for that toolkit.
    if variant.stable_abi:
        return host.minor >= variant.torch
    if variant.cuda is not None and host.cuda != variant.cuda_str:
        return False
    return host.minor == variant.torch


def resolve(variant, *, log=print) -> Toolchain:
    """The toolchain for `variant`, fetching and caching registry pieces when needed.

    Raises PipelineError when it cannot be had, saying why and what would fix it.
    """
    availability_ = availability(variant)
    if not availability_.buildable:
        raise PipelineError(
            f"variant {variant} is not buildable here: {availability_.how}",
            where=str(variant),
            fix="build it in the release workflow's container, or install that CUDA toolkit and set CUDA_HOME",
        )
    host = host_torch()
    if host is not None and _host_serves(host, variant):
        torch = host
    else:
        torch = _cached_torch(variant.torch) or fetch_torch(variant.torch, log=log)
    cuda = None
    if variant.cuda is not None:
        hc = host_cuda()
        if hc is not None and hc.version == variant.cuda:
            cuda = hc
        else:
            cuda = _cached_cuda(variant.cuda) or fetch_cuda(variant.cuda, log=log)
    return Toolchain(torch=torch, cuda=cuda)


def _pip_download(requirements: list[str], dest: Path, log) -> list[Path]:
    """Download wheels (no dependencies) with the user's pip, bypassing local wheel folders.

    PIP_CONFIG_FILE=/dev/null and an empty PIP_FIND_LINKS keep pip from taking a local
    CPU-only torch wheel or a site constraint that caps the version.
    """
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_FIND_LINKS="")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), *requirements]
    log(f"fetching from the package registry: {' '.join(requirements)}")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise PipelineError(
            f"could not download {' '.join(requirements)} from the package registry:\n{tail}",
            where=" ".join(cmd),
            fix="check network access to the package registry (pip must reach it), or install the toolchain on the host",
        )
    wheels = sorted(dest.glob("*.whl"))
    for w in wheels:
        log(f"  fetched {w.name} ({w.stat().st_size / 1e6:.1f} MB)")
    return wheels


def fetch_torch(minor: tuple[int, int], *, log=print) -> TorchToolchain:
    """Download the torch `minor` wheel and keep its headers and link libraries in the cache."""
    target = cache_dir() / f"torch-{minor[0]}.{minor[1]}"
    keep = {f"torch/lib/{name}" for name in TORCH_LINK_LIBS} | {"torch/version.py"}
    with tempfile.TemporaryDirectory(prefix="torch-wheel-") as tmp:
        (wheel,) = _pip_download([f"torch=={minor[0]}.{minor[1]}.*"], Path(tmp), log)
        if target.exists():
            shutil.rmtree(target)
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith("torch/include/") or m in keep]
            log(f"  unpacking {len(members)} files into {target}")
            zf.extractall(target, members)
    (target / ".complete").write_text(wheel.name + "\n")
    found = _torch_at(target / "torch", "registry")
    if found is None:
        raise PipelineError(f"torch wheel {wheel.name} has no headers or version.py", where=str(target))
    return found


def fetch_cuda(version: tuple[int, int], *, log=print) -> CudaToolchain:
    """Assemble a CUDA 13.x toolkit root from NVIDIA's compiler wheels into the cache."""
    if version[0] < 13:
        raise PipelineError(
            f"CUDA {version[0]}.{version[1]} cannot be assembled from wheels: the cu12 nvcc wheels ship no nvcc driver",
            fix=f"install a CUDA {version[0]}.{version[1]} toolkit and set CUDA_HOME",
        )
    target = cache_dir() / f"cuda-{version[0]}.{version[1]}"
    with tempfile.TemporaryDirectory(prefix="cuda-wheels-") as tmp:
        wheels = _pip_download([f"{w}=={version[0]}.{version[1]}.*" for w in CUDA13_WHEELS], Path(tmp), log)
        if target.exists():
            shutil.rmtree(target)
        prefix = f"nvidia/cu{version[0]}/"
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as zf:
                for info in zf.infolist():
                    if not info.filename.startswith(prefix) or info.is_dir():
                        continue
                    dest = target / info.filename[len(prefix):]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out)
                    # Wheels keep Unix permissions in external_attr; executables need them.
                    mode = (info.external_attr >> 16) & 0o777
                    if mode:
                        dest.chmod(mode)
    # nvcc.profile looks for $(TOP)/targets/<arch>/{include,lib} and lib64; make the
    # wheel layout (include/, lib/) look like a toolkit install.
    (target / "targets" / "x86_64-linux").mkdir(parents=True, exist_ok=True)
    for name in ("include", "lib"):
        link = target / "targets" / "x86_64-linux" / name
        if not link.exists():
            link.symlink_to(Path("..") / ".." / name)
    if not (target / "lib64").exists():
        (target / "lib64").symlink_to("lib")
    got = nvcc_version(target / "bin" / "nvcc")
    if got != version:
        raise PipelineError(
            f"assembled CUDA toolkit at {target} reports nvcc {got}, expected {version[0]}.{version[1]}",
            where=str(target),
            fix="delete that directory and rerun; if it persists, install the toolkit on the host",
        )
    (target / ".complete").write_text("\n".join(w.name for w in wheels) + "\n")
    return CudaToolchain(version=version, root=target, source="registry")
