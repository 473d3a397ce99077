"""`flash-attn-kernel build`: compile variants into verified build/<variant>/ directories.

One generated CMake project per (backend, CUDA toolkit) lives under `_build/<group>/`:
kernel sources are compiled there once into static libraries, and each torch variant of
the group adds only its binding module. Ninja drives it with all cores, so rebuilds are
incremental. Each variant is assembled in a staging directory, checked, and only then
moved to build/<variant>/, so a failed build leaves earlier builds intact.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import PipelineError

TEMPLATES = Path(__file__).parent / "templates"

# Every TU (kernels and binding) reads libstdc++'s single-threaded flag from our private
# symbol instead of glibc 2.32's; see templates/manylinux_compat.c for why this is sound.
MANYLINUX_DEFINE = "__libc_single_threaded=flash_kernel_libc_single_threaded"

# torch's COMMON_NVCC_FLAGS minus the __CUDA_NO_HALF*/BFLOAT16 defines (kernel-builder drops
# them so kernels can use the half/bfloat16 operators), plus kernel-builder's FP8 switch.
# --threads=0 compiles a file's architectures in parallel (one file otherwise keeps one core busy).
NVCC_FLAGS = ("-O3", "--expt-relaxed-constexpr", "-DENABLE_FP8", "--threads=0")


@dataclass
class _Unit:
    """One variant's build job: its plan, toolchain and names."""

    planned: object  # plan.PlannedVariant
    toolchain: object  # toolchain.Toolchain
    ops_name: str
    target: str  # CMake target of the extension module

    @property
    def variant(self):
        return self.planned.variant


def _cxx_standard(torch_minor: tuple[int, int]) -> int:
    # kernel-builder: C++17 for torch < 2.12, C++20 from 2.12 on.
    return 17 if torch_minor < (2, 12) else 20


def _torch_target_version(floor: tuple[int, int]) -> str:
    # torch/csrc/stable/version.h: (major << 56) | (minor << 48), e.g. 2.11 -> 0x020b000000000000.
    return f"0x{(floor[0] << 56) | (floor[1] << 48):016x}"


def _gencode(arch: str) -> str:
    # "9.0a" -> compute_90a/sm_90a: arch-specific features (wgmma, TMA) need the suffix on both.
    num = arch.replace(".", "")
    return f"-gencode=arch=compute_{num},code=sm_{num}"


def _cmake_list(items) -> str:
    return " ".join(f'"{i}"' for i in items)


def _render_group(project, group: str, units: list[_Unit], gen_include: Path, out_dir: Path) -> str:
    """The CMakeLists.txt of one group: kernel libraries once, one module per variant."""
    first = units[0]
    backend = first.variant.backend
    cuda = first.toolchain.cuda
    blocks: list[str] = []
    kernel_targets = []
    kernel_archs = first.planned.kernel_archs(project)
    for k in project.kernels_for(backend):
        if backend == "cuda" and k.name not in kernel_archs:
            continue  # cuda-minver above this toolkit: kernel-builder skips the component
        sources = [project.root / s for s in k.compiled_sources()]
        if not sources:
            continue
        target = "kernel_" + re.sub(r"\W", "_", k.name)
        kernel_targets.append(target)
        includes = [project.root / i for i in k.include]
        defines = ["CPU_KERNEL"] if backend == "cpu" else ["CUDA_KERNEL", "USE_CUDA=1"]
        defines.append(MANYLINUX_DEFINE)
        # -fno-gnu-unique everywhere the module's code comes from: STB_GNU_UNIQUE symbols would
        # bind across modules of different builds and keep the module from ever unloading.
        cxx = ["-fno-gnu-unique", *k.cxx_flags]
        blocks.append(f"add_library({target} STATIC {_cmake_list(sources)})")
        blocks.append(f"target_include_directories({target} PRIVATE {_cmake_list(includes)})")
        blocks.append(f"target_compile_definitions({target} PRIVATE {_cmake_list(defines)})")
        # Kernels include no torch header and are shared by every torch variant, so they use
        # the standard of the oldest supported torch; C++17 and C++20 objects link together.
        blocks.append(f"set_target_properties({target} PROPERTIES CXX_STANDARD 17 CXX_STANDARD_REQUIRED ON)")
        blocks.append(f"target_compile_options({target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:{';'.join(cxx)}>)")
        if backend == "cuda":
            nvcc = list(NVCC_FLAGS) + [_gencode(a) for a in kernel_archs[k.name]] + list(k.cuda_flags)
            blocks.append(f"set_target_properties({target} PROPERTIES CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON)")
            blocks.append(f"target_compile_options({target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:{';'.join(nvcc)}>)")
            xc = ";".join(f"-Xcompiler={f}" for f in cxx)
            blocks.append(f"target_compile_options({target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:{xc}>)")
        blocks.append("")
    binding_sources = [project.root / s for s in project.torch_src if s.endswith((".cpp", ".cc", ".cxx"))]
    for u in units:
        v = u.variant
        torch = u.toolchain.torch
        t = u.target
        sources = binding_sources + [gen_include / "manylinux_compat.c"]
        defines = [f"TORCH_EXTENSION_NAME={u.ops_name}", "_GLIBCXX_USE_CXX11_ABI=1", MANYLINUX_DEFINE]
        defines += ["CPU_KERNEL"] if v.backend == "cpu" else ["CUDA_KERNEL", "USE_CUDA=1"]
        if v.stable_abi:
            defines.append(f"TORCH_TARGET_VERSION={_torch_target_version(v.torch)}")
        std = _cxx_standard(v.torch if not v.stable_abi else torch.minor)
        includes = [gen_include, project.root / "torch-ext"] + [project.root / i for i in project.torch_include]
        includes += sorted({project.root / i for k in project.kernels_for(v.backend) for i in k.include})
        libs = [f'"{lib}"' for lib in torch.libraries]
        if v.backend == "cuda":
            includes.append(cuda.root / "include")
            # ATen's CUDA headers include cuBLAS/cuSPARSE headers, which a CUDA torch gets
            # from NVIDIA's wheels next to it (site-packages/nvidia/cu<major>/include).
            nvidia = torch.root.parent / "nvidia" / f"cu{cuda.version[0]}" / "include"
            if nvidia.is_dir():
                includes.append(nvidia)
            libs += _cuda_link_items(torch, cuda, gen_include.parent / "stubs", stable_abi=v.stable_abi)
        blocks.append(f"Python3_add_library({t} MODULE USE_SABI 3.9 WITH_SOABI {_cmake_list(sources)})")
        blocks.append(f"target_include_directories({t} PRIVATE {_cmake_list(includes)})")
        blocks.append(f"target_include_directories({t} SYSTEM PRIVATE {_cmake_list(torch.include_dirs)})")
        blocks.append(f"target_compile_definitions({t} PRIVATE {_cmake_list(defines)})")
        opts = ["-fno-gnu-unique"] + list(project.torch_cxx_flags)
        blocks.append(f"target_compile_options({t} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:{';'.join(opts)}>)")
        blocks.append(f"target_link_libraries({t} PRIVATE {' '.join(kernel_targets)} {' '.join(libs)})")
        # No RPATH: libtorch/libc10 resolve by soname from the torch that is already imported.
        blocks.append(
            f"set_target_properties({t} PROPERTIES OUTPUT_NAME {u.ops_name} "
            f'LIBRARY_OUTPUT_DIRECTORY "{out_dir / str(v)}" CXX_STANDARD {std} CXX_STANDARD_REQUIRED ON '
            "SKIP_BUILD_RPATH ON C_VISIBILITY_PRESET hidden)"
        )
        blocks.append("")
    languages = "C CXX" + (" CUDA" if backend == "cuda" else "")
    text = (TEMPLATES / "CMakeLists.txt.in").read_text()
    return text.replace("@PROJECT@", f"flash_kernel_{group.replace('.', '_').replace('-', '_')}").replace(
        "@LANGUAGES@", languages
    ).replace("@TARGETS@", "\n".join(blocks))


def _cuda_link_items(torch, cuda, stub_dir: Path, *, stable_abi: bool) -> list[str]:
    """Link items that give a CUDA module NEEDED entries for libtorch_cuda.so and libcudart.so.<major>.

    cudart is linked dynamically, as kernel-builder does: static cudart would pull in
    GLIBC_2.34 symbols (dlopen, pthread_*) and break manylinux_2_28; torch's own libcudart
    (same soname) is already loaded when the module is imported. The CUDA shims
    (aoti_torch_get_current_cuda_stream, ...) live in libtorch_cuda.so; when the torch we
    compile against is a CPU build, an empty stub with that soname stands in at link time
    only, so the module still records the dependency the real CUDA torch satisfies at load.
    """
    real = torch.root / "lib" / "libtorch_cuda.so"
    if real.is_file():
        torch_cuda = real
    else:
        torch_cuda = _torch_cuda_stub(stub_dir)
    cudart = _find_cudart(cuda)
    if not stable_abi:
        # Full ABI: the host torch is a CUDA build (toolchain.availability), so link its libraries.
        return [f'"{real}"', f'"{torch.root / "lib" / "libc10_cuda.so"}"', f'"{cudart}"']
    # --no-as-needed: the stub defines nothing, so --as-needed would drop the NEEDED entry.
    return ["-Wl,--push-state,--no-as-needed", f'"{torch_cuda}"', "-Wl,--pop-state", f'"{cudart}"']


def _find_cudart(cuda) -> Path:
    """libcudart.so.<major> of a toolkit: wheel layouts use lib/, installers lib64/ or targets/<arch>/lib."""
    name = f"libcudart.so.{cuda.version[0]}"
    for sub in ("lib", "lib64", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        if (cuda.root / sub / name).exists():
            return cuda.root / sub / name
    raise PipelineError(f"no {name} in the CUDA toolkit at {cuda.root}", where=str(cuda.root),
                        fix="install the CUDA runtime (nvidia-cuda-runtime wheel or the toolkit's cudart)")


def _torch_cuda_stub(stub_dir: Path) -> Path:
    stub = stub_dir / "libtorch_cuda.so"
    if stub.is_file():
        return stub
    stub_dir.mkdir(parents=True, exist_ok=True)
    src = stub_dir / "torch_cuda_stub.c"
    src.write_text("/* Link-time stand-in for libtorch_cuda.so; never shipped or loaded. */\n")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise PipelineError("no C compiler (cc/gcc) on PATH", fix="install gcc")
    subprocess.run([cc, "-shared", "-o", str(stub), "-Wl,-soname,libtorch_cuda.so", str(src)], check=True)
    return stub


def _write_if_changed(path: Path, text: str) -> None:
    # Unchanged files keep their mtime, so CMake does not reconfigure and ninja does not rebuild.
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _group_key(unit: _Unit) -> str:
    v = unit.variant
    return "cpu" if v.cuda is None else f"cuda-{v.cuda_str}"


def _launcher_args() -> list[str]:
    for tool in ("sccache", "ccache"):
        path = shutil.which(tool)
        if path:
            return [f"-D{lang}_COMPILER_LAUNCHER={path}" for lang in ("CMAKE_C", "CMAKE_CXX", "CMAKE_CUDA")]
    return []


def _configure(group_dir: Path, units: list[_Unit]) -> None:
    cuda = units[0].toolchain.cuda
    if (group_dir / "build" / "build.ninja").exists():
        return  # ninja re-runs CMake itself when CMakeLists.txt changed
    args = [
        "cmake", "-S", str(group_dir), "-B", str(group_dir / "build"), "-G", "Ninja",
        "-DCMAKE_BUILD_TYPE=Release", f"-DPython3_EXECUTABLE={sys.executable}",
        "-DCMAKE_MESSAGE_LOG_LEVEL=WARNING", *_launcher_args(),
    ]
    env = dict(os.environ)
    if cuda is not None:
        args += [f"-DCMAKE_CUDA_COMPILER={cuda.nvcc}", "-DCMAKE_CUDA_ARCHITECTURES=OFF"]
        # torch would guess CUDA_HOME from a wrapper nvcc on PATH; point everything at the toolkit.
        env["CUDA_HOME"] = str(cuda.root)
        env["CUDACXX"] = str(cuda.nvcc)
    log = group_dir / "configure.log"
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        errors = [l for l in (proc.stdout + proc.stderr).splitlines() if "Error" in l or "error" in l][:8]
        raise PipelineError(
            "CMake configure failed for " + ", ".join(str(u.variant) for u in units) + ":\n  " + "\n  ".join(errors),
            where=str(log),
            fix="read the full log; a missing compiler or Python headers is the usual cause",
        )


def _ninja(project, group_dir: Path, units: list[_Unit], jobs: int, progress) -> None:
    targets = [u.target for u in units]
    log_path = group_dir / "build.log"
    cmd = ["ninja", "-C", str(group_dir / "build"), f"-j{jobs}", *targets]
    env = dict(os.environ, NINJA_STATUS="[%f/%t] ")
    cuda = units[0].toolchain.cuda
    if cuda is not None:
        env["CUDA_HOME"] = str(cuda.root)
    lines: list[str] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            lines.append(line.rstrip("\n"))
            progress.ninja_line(line)
        rc = proc.wait()
    if rc != 0:
        raise _compile_error(project, lines, log_path, units)


def _compile_error(project, lines: list[str], log_path: Path, units: list[_Unit]) -> PipelineError:
    failed = next((l for l in lines if l.startswith("FAILED:")), "")
    # The failing source is the first project file named after FAILED: (object path or source).
    src = None
    for l in lines[lines.index(failed):] if failed else lines:
        m = re.search(r"(/\S+\.(?:cpp|cc|cu|c|h|cuh|hpp))", l)
        if m and m.group(1).startswith(str(project.root)) and "_build" not in m.group(1):
            src = m.group(1)
            break
    errors = [l for l in lines if re.search(r"\berror\b", l)][:6]
    return PipelineError(
        "compile failed for " + ", ".join(str(u.variant) for u in units)
        + (f" in {os.path.relpath(src, project.root)}" if src else "")
        + ":\n  " + "\n  ".join(errors or lines[-6:]),
        where=str(log_path),
        fix="fix the error above (full log at the path shown) and rerun `flash-attn-kernel build`",
    )


def _jobs(jobs: int | None) -> int:
    if jobs:
        return jobs
    env = os.environ.get("MAX_JOBS")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise PipelineError(f"MAX_JOBS={env!r} is not a positive integer", fix="set MAX_JOBS to e.g. 8, or unset it")
        return int(env)
    return len(os.sched_getaffinity(0))


def build(project: Path, variants: Sequence[str] | None = None, *, jobs: int | None = None,
          console=None, redistributable: bool = False) -> list[Path]:
    """Build, check and install variants of the kernel project at `project`.

    `variants`: variant names; None builds those the host's own torch and nvcc build
    (`plan.host_variants`). Registry toolchains are fetched and cached for named variants.
    `redistributable` requires manylinux_2_28 (release builds); otherwise the level reached is
    reported, since a local build against a newer glibc cannot reach it.
    Returns the build/<variant>/ directories written. Raises PipelineError (earlier builds
    untouched) for a bad build.toml, an unknown variant, a missing toolchain, a compile
    error or a failed check.
    """
    from . import layout, plan, toolchain
    from .check import MANYLINUX, check_variant
    from .progress import BuildProgress
    from .project import load, ops_name, source_state

    proj = load(Path(project))
    planned = plan.select(proj, list(variants) if variants is not None else None)
    if not planned:
        raise PipelineError(
            "no variant of build.toml can be built on this machine",
            where=str(proj.root / "build.toml"),
            fix="run `flash-attn-kernel variants` to see why",
        )
    if not (proj.package_dir / "__init__.py").is_file():
        raise PipelineError(
            f"the Python package {proj.package_dir}/__init__.py does not exist",
            where=str(proj.package_dir), fix=f"create torch-ext/{proj.python_name}/__init__.py (the kernel's user API)",
        )
    _require_sources(proj, planned)
    state = source_state(proj.root)
    n_jobs = _jobs(jobs)
    progress = BuildProgress(console)
    work = proj.root / "_build"
    gen_include = work / "include"
    gen_include.mkdir(parents=True, exist_ok=True)
    _write_if_changed(gen_include / "registration.h", (TEMPLATES / "registration.h").read_text())
    _write_if_changed(gen_include / "manylinux_compat.c", (TEMPLATES / "manylinux_compat.c").read_text())

    units = []
    for p in planned:
        tc = toolchain.resolve(p.variant, log=progress.log)
        target = "ext_" + re.sub(r"\W", "_", str(p.variant))
        units.append(_Unit(p, tc, ops_name(proj, p.variant.backend, state.uid), target))

    groups: dict[str, list[_Unit]] = {}
    for u in units:
        groups.setdefault(_group_key(u), []).append(u)

    written: list[Path] = []
    with progress:
        for group, members in groups.items():
            group_dir = work / group
            out_dir = group_dir / "out"
            _write_if_changed(group_dir / "CMakeLists.txt", _render_group(proj, group, members, gen_include, out_dir))
            progress.start_group(group, {u.target: str(u.variant) for u in members})
            _configure(group_dir, members)
            _ninja(proj, group_dir, members, n_jobs, progress)
            progress.finish_group()
            for u in members:
                module = next((out_dir / str(u.variant)).glob(f"{u.ops_name}.*so"), None)
                if module is None:
                    raise PipelineError(f"ninja succeeded but built no module for {u.variant}", where=str(out_dir))
                progress.log(f"checking {u.variant}")
                check = functools.partial(check_variant, manylinux=MANYLINUX if redistributable else None)
                written.append(_install(proj, u, module, state, check, layout, progress))
    return written


def _require_sources(proj, planned) -> None:
    """Fail before any compile when build.toml lists files that do not exist."""
    backends = {p.variant.backend for p in planned}
    listed = list(proj.torch_src) + [s for k in proj.kernels if k.backend in backends for s in k.src]
    missing = [s for s in listed if not (proj.root / s).is_file()]
    if missing:
        raise PipelineError(
            f"build.toml lists {len(missing)} source file(s) that do not exist: {', '.join(missing)}",
            where=str(proj.root / "build.toml"),
            fix="create the files or remove them from build.toml's src lists",
        )


def _install(proj, unit: _Unit, module: Path, state, check_variant, layout, progress) -> Path:
    final = proj.root / "build" / str(unit.variant)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = final.parent / f".staging-{unit.variant}"
    if stage.exists():
        shutil.rmtree(stage)
    try:
        layout.assemble(stage, proj, unit.planned, unit.ops_name, module, state)
        report = check_variant(stage, variant_name=str(unit.variant))
        progress.report(report)
        if not report.ok:
            raise PipelineError(
                f"checks failed for {unit.variant}:\n  " + "\n  ".join(r.summary() for r in report.failures()),
                where=str(module),
                fix="see the failing check above; earlier builds in build/ were left untouched",
            )
        old = final.parent / f".old-{unit.variant}"
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            final.rename(old)
        stage.rename(final)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    return final


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--variant", action="append", metavar="NAME",
                       help="variant to build (repeatable; default: those the host toolchain builds)")
    group.add_argument("--all", action="store_true",
                       help="every variant buildable here, fetching toolchains from the registry as needed")
    parser.add_argument("--redistributable", action="store_true",
                        help="require manylinux_2_28 (release builds; default: report the level reached)")
    parser.add_argument("--jobs", "-j", type=int, default=None, help="parallel compile jobs (default: $MAX_JOBS or all cores)")


def run(args: argparse.Namespace) -> int:
    from . import plan, toolchain
    from .progress import make_console
    from .project import load

    console = make_console()
    if args.jobs is not None and args.jobs < 1:
        raise PipelineError(f"--jobs {args.jobs}: expected a positive integer")
    names = args.variant
    if args.all:
        names = []
        for p in plan.matrix(load(Path(args.project))):
            a = toolchain.availability(p.variant)
            if a.buildable:
                names.append(str(p.variant))
            else:
                console.print(f"skipping {p.variant}: {a.how}", markup=False, highlight=False)
    paths = build(Path(args.project), names, jobs=args.jobs, console=console,
                  redistributable=args.redistributable)
    for p in paths:
        console.print(f"built {p}", markup=False, highlight=False)
    return 0
