"""A variant directory exactly as kernel-builder writes it.

    build/<variant>/
        __init__.py, *.py (+ build.toml's extra pyext data files)   copied from torch-ext/<python_name>/
        _ops.py                                                     generated: imports the module, `ops`, prefix helper
        <id>.abi3.so                                                the extension; `id` is the op namespace
        metadata.json                                               name, id, version, ..., backend, digest, provenance
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import __version__
from .errors import PipelineError

TEMPLATES = Path(__file__).parent / "templates"


def package_files(project) -> list[Path]:
    """Files of torch-ext/<python_name>/ that ship in a compiled variant, relative to it.

    Like kernel-builder's CMake install: `*.py` plus build.toml's extra pyext extensions
    (`.pyi` stubs are not shipped in compiled variants); bytecode and a stale generated
    `_ops.py` are left out.
    """
    exts = {"py"} | (set(project.pyext) - {"py", "pyi"})
    root = project.package_dir
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or "__pycache__" in rel.parts or rel == Path("_ops.py"):
            continue
        if path.suffix.lstrip(".") in exts:
            out.append(rel)
    return out


def render_ops(ops_name: str) -> str:
    """The generated `_ops.py` for an op namespace."""
    return (TEMPLATES / "_ops.py.in").read_text().replace("${ops_name}", ops_name)


def metadata(project, planned, ops_name: str, state) -> dict:
    """metadata.json's content in kernel-builder's key order; `digest` is left for assemble()."""
    v = planned.variant
    data: dict = {"name": project.name, "id": ops_name, "version": project.version, "license": project.license}
    if project.upstream:
        data["upstream"] = project.upstream
    if project.source:
        data["source"] = project.source
    data["python-depends"] = project.python_depends_for(v.backend)
    data["kernel-depends"] = project.kernel_depends_for(v.backend)
    backend: dict = {"type": v.backend}
    if v.backend == "cuda":
        backend["archs"] = list(planned.archs)
    data["backend"] = backend
    data["digest"] = None  # filled by assemble(); keeps kernel-builder's key order
    provenance: dict = {"kernel-builder": {"version": f"flash-attn-kernel-{__version__}"}}
    if state.commit:
        provenance["kernel"] = {"commit": state.commit, "dirty": state.dirty}
    data["provenance"] = provenance
    return data


def assemble(stage: Path, project, planned, ops_name: str, module: Path, state) -> None:
    """Write a complete variant directory at `stage` (package, _ops.py, module, metadata)."""
    from kernels._rust import Digest, DigestAlgorithm, Metadata

    stage.mkdir(parents=True)
    for rel in package_files(project):
        dest = stage / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(project.package_dir / rel, dest)
    (stage / "_ops.py").write_text(render_ops(ops_name))
    shutil.copy2(module, stage / f"{ops_name}.abi3.so")
    data = metadata(project, planned, ops_name, state)
    # The digest covers every file but metadata.json itself, so hash before writing it.
    digest = Digest.hash_variant(DigestAlgorithm.SHA256, stage)
    data["digest"] = {"algorithm": "sha256", "files": dict(sorted(digest.files.items()))}
    meta_path = stage / "metadata.json"
    meta_path.write_text(json.dumps(data, indent=2) + "\n")
    # Read it back through the loader's own parser: what we wrote is what `kernels` accepts.
    try:
        Metadata.read_from_file(meta_path)
    except ValueError as err:
        raise PipelineError(f"kernels rejects the metadata.json we wrote: {err}", where=str(meta_path),
                            fix="check build.toml's general section (name, license, python-depends)") from None
