"""Publish verified builds: to a Hub repository of type `kernel`, or to the embedded local repository.

What goes where is what Hugging Face's `kernel-builder upload` writes:

- branch `v<general.version>` (or `--branch`): `build/<variant>/**` of every published variant,
  `benchmarks/benchmark*.py` and `benchmarks/results/**`. Files under the published variants'
  directories that the build no longer has are deleted; a new branch starts from `main` and
  everything under `build/` and `benchmarks/` it inherited is deleted.
- branch `main`: `README.md`, the card (card.py), and the benchmark plot it shows.

Only builds that passed their checks are published: every variant's metadata.json must parse
with the `kernels` loader's own parser and carry a digest that matches its files, every variant
must be one version of one kernel built from one source tree (one op-namespace uid), and the
version must be build.toml's. Publishing what the repository already holds changes nothing.

Nothing published is lost when a publish fails or is interrupted:

- Hub: each branch receives one commit (`create_commit` is atomic on the Hub: the whole commit
  lands or nothing does), made against the head it was planned from (`parent_commit`, so a
  concurrent change fails the commit instead of being overwritten). The version branch is
  committed before the card, so a card never advertises files that are not there; a version
  branch created by this publish is deleted again when its commit fails. If the card's commit
  fails after the version branch's landed, the builds are published and the card is stale
  until the next publish, which finds only the card to write. Only a build of more than
  `MAX_OPERATIONS_PER_COMMIT` files is split into several commits, as kernel-builder does.
- Local: all objects are written first and the branches then move in one atomic ref
  transaction (see localhub.py).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import PipelineError

# Operations per Hub commit: kernel-builder's batch size for its uploads.
MAX_OPERATIONS_PER_COMMIT = 1000
COMMIT_MESSAGE = "Uploaded using `flash-attn-kernel publish`."
PLACEHOLDER_ORG = "your-org"
HUB_DIR = ".hub"
CARD_PATH = "README.md"
PLOT_PATH = "media/benchmarks.svg"
# Files the loader never reads and that differ between otherwise identical builds.
_SKIPPED_PARTS = ("__pycache__",)
_SKIPPED_SUFFIXES = (".pyc",)


# -- values ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuiltVariant:
    """A verified build/<variant>/ directory and the facts publishing needs from its metadata.json."""

    name: str
    path: Path
    kernel_id: str
    backend: str
    archs: tuple[str, ...]
    version: int
    uid: str


@dataclass(frozen=True)
class LocalFile:
    """A file to publish: where it comes from and its ids as the Hub and git report them."""

    source: Path | bytes
    executable: bool = False

    def ids(self) -> tuple[str, str]:
        """(git blob id, sha256): what a Hub tree lists for regular and for LFS/xet files."""
        size = len(self.source) if isinstance(self.source, bytes) else self.source.stat().st_size
        blob, sha = hashlib.sha1(b"blob %d\0" % size), hashlib.sha256()
        for chunk in self._chunks():
            blob.update(chunk)
            sha.update(chunk)
        return blob.hexdigest(), sha.hexdigest()

    def _chunks(self):
        if isinstance(self.source, bytes):
            yield self.source
            return
        with self.source.open("rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk


@dataclass(frozen=True)
class RemoteFile:
    """A file already in the repository: its git blob id and, for LFS/xet files, its sha256."""

    blob_id: str
    sha256: str | None = None

    def matches(self, local: LocalFile) -> bool:
        blob, sha = local.ids()
        return self.sha256 == sha if self.sha256 else self.blob_id == blob


@dataclass
class BranchChange:
    """What one branch receives: files added or replaced and files deleted."""

    branch: str
    exists: bool
    base: str | None
    adds: list[str]
    deletes: list[str]
    commit: str | None = None
    url: str | None = None

    @property
    def empty(self) -> bool:
        return not self.adds and not self.deletes


@dataclass
class PublishResult:
    """The outcome of a publish: what changed per branch and where to load the kernel from.

    `status` is "published", "pull_request", "no_changes" or "dry_run". `load_path` is the
    checkout of the version branch for the embedded repository (LOCAL_KERNELS points there),
    None for the Hub.
    """

    target: str
    repo_id: str
    version: int
    variants: list[str]
    status: str
    branches: list[BranchChange] = field(default_factory=list)
    load_path: Path | None = None
    location: str = ""
    dirty_variants: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs: where it went and what changed."""
        if self.status == "no_changes":
            return f"{self.repo_id}: already up to date at {self.location} (nothing published)"
        changes = ", ".join(f"{c.branch} +{len(c.adds)}/-{len(c.deletes)}" for c in self.branches if not c.empty)
        verb = {"dry_run": "would publish", "pull_request": "opened pull requests for"}.get(self.status, "published")
        return f"{self.repo_id}: {verb} {len(self.variants)} variant(s) to {self.location} ({changes})"


@dataclass(frozen=True)
class Upload:
    """Everything one publish writes, per branch, and which existing files it owns (may delete)."""

    repo_id: str
    version: int
    version_branch: str
    version_files: dict[str, LocalFile]
    main_files: dict[str, LocalFile]
    variants: list[BuiltVariant]

    def owned(self, new_branch: bool) -> Callable[[str], bool]:
        """Which existing version-branch paths this publish replaces (deleting what it does not re-add)."""
        if new_branch:
            return lambda p: p.startswith(("build/", "benchmarks/"))
        prefixes = tuple(f"build/{v.name}/" for v in self.variants) + ("benchmarks/results/",)
        return lambda p: p.startswith(prefixes) or fnmatch.fnmatchcase(p, "benchmarks/benchmark*.py")


# -- collecting and verifying builds ----------------------------------------------------------
def collect_variants(project: Path, names: list[str] | None = None) -> list[BuiltVariant]:
    """The verified variants under `<project>/build/` (all, or those named); refuses anything unverified."""
    from . import project as project_stage

    config = project_stage.load(project)
    build = Path(project) / "build"
    found = sorted(p.parent for p in build.glob("*/metadata.json")) if build.is_dir() else []
    if names:
        missing = [n for n in names if not (build / n / "metadata.json").is_file()]
        if missing:
            raise PipelineError(
                f"--variant {', '.join(missing)}: no such build under {build}",
                where=str(build),
                fix=f"build it first (flash-attn-kernel build --variant {missing[0]}) or pick one of: "
                + (", ".join(p.name for p in found) or "(none built)"),
            )
        found = [build / n for n in names]
    if not found:
        raise PipelineError(
            f"nothing to publish: no build/<variant>/metadata.json under {build}",
            where=str(build),
            fix="run `flash-attn-kernel build` first",
        )
    variants = [_verify(path, config) for path in found]
    uids = sorted({v.uid for v in variants})
    if len(uids) > 1:
        listing = "; ".join(f"{v.name}: {v.kernel_id}" for v in variants)
        raise PipelineError(
            f"the builds come from different source trees (op namespace uids {', '.join(uids)}): {listing}",
            where=str(build),
            fix="rebuild every variant from the same commit (or publish a subset with --variant)",
        )
    return variants


def _verify(path: Path, config) -> BuiltVariant:
    from kernels._rust import Digest, DigestValidationError, Metadata

    meta_path = path / "metadata.json"
    where = str(meta_path)
    try:
        meta = Metadata.read_from_file(meta_path)
    except (OSError, ValueError) as err:
        raise PipelineError(f"variant {path.name}: metadata.json does not parse: {err}", where=where,
                            fix=f"rebuild it: flash-attn-kernel build --variant {path.name}") from None
    if not _variant_name_ok(path.name):
        raise PipelineError(f"variant directory {path.name!r} is not a kernel-builder variant name; "
                            "the kernels loader would silently skip it", where=str(path),
                            fix="publish only directories written by `flash-attn-kernel build`")
    if str(meta.name) != config.name:
        raise PipelineError(f"variant {path.name} is kernel {str(meta.name)!r}, expected {config.name!r} "
                            "(build.toml's general.name)", where=where, fix="rebuild it from this project")
    if meta.version != config.version:
        raise PipelineError(
            f"variant {path.name} has version {meta.version}, expected {config.version} (build.toml's general.version)",
            where=where, fix=f"rebuild it: flash-attn-kernel build --variant {path.name}")
    backend = str(meta.backend.backend_type).lower()
    prefix = f"_{config.python_name}_{backend}_"
    if not meta.id.startswith(prefix) or len(meta.id) == len(prefix):
        raise PipelineError(f"variant {path.name} has id {meta.id!r}, expected {prefix}<uid>", where=where,
                            fix=f"rebuild it: flash-attn-kernel build --variant {path.name}")
    if meta.digest is None:
        raise PipelineError(f"variant {path.name} was not verified: its metadata.json has no digest", where=where,
                            fix=f"run `flash-attn-kernel check` (or rebuild: flash-attn-kernel build --variant {path.name})")
    try:
        meta.digest.validate(Digest.hash_variant(meta.digest.algorithm, path))
    except DigestValidationError as err:
        problems = [str(v) for v in err.violations][:5]
        raise PipelineError(
            f"variant {path.name} changed after it was checked: its files do not match metadata.json's digest "
            f"({'; '.join(problems)})", where=str(path),
            fix=f"rebuild it: flash-attn-kernel build --variant {path.name}") from None
    _check_report_passed(path)
    return BuiltVariant(
        name=path.name,
        path=path,
        kernel_id=meta.id,
        backend=backend,
        archs=tuple(meta.backend.archs or ()),
        version=meta.version,
        uid=meta.id[len(prefix):],
    )


def _variant_name_ok(name: str) -> bool:
    from kernels.variants import parse_variant

    try:
        parsed = parse_variant(name)
    except (ValueError, IndexError, KeyError):
        return False
    # The loader compares names through this round trip, so a name it would spell differently
    # is one it never selects.
    return getattr(parsed, "variant_str", name) == name


def _check_report_passed(path: Path) -> None:
    """Refuse a variant whose check report (written next to it by `flash-attn-kernel check`) did not pass.

    The report is `build/<variant>.check.json` with a boolean `passed`; without one, the
    digest verified above is the proof that the files are the ones the build produced.
    """
    report_path = path.with_name(f"{path.name}.check.json")
    if not report_path.is_file():
        return
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError) as err:
        raise PipelineError(f"variant {path.name}: check report does not parse: {err}", where=str(report_path),
                            fix="run `flash-attn-kernel check` again") from None
    if report.get("passed") is not True:
        raise PipelineError(f"variant {path.name} failed its checks", where=str(report_path),
                            fix="fix what the report lists, rebuild, and run `flash-attn-kernel check`")


# -- what to upload -----------------------------------------------------------------------------
def plan_upload(project: Path, variants: list[BuiltVariant], repo_id: str, branch: str,
                other_variants: list[str] = ()) -> Upload:
    """The files of each branch for these variants: build/, benchmarks/ and the card.

    `other_variants` are variants already on the version branch that this publish leaves in
    place; the card lists them too.
    """
    from . import card
    from . import project as project_stage

    config = project_stage.load(project)
    version_files: dict[str, LocalFile] = {}
    for v in variants:
        for f in sorted(v.path.rglob("*")):
            rel = f.relative_to(v.path)
            if f.is_file() and not _skipped(rel):
                version_files[f"build/{v.name}/{rel.as_posix()}"] = LocalFile(f, os.access(f, os.X_OK))
    bench = Path(project) / "benchmarks"
    for f in sorted(bench.glob("benchmark*.py")):
        version_files[f"benchmarks/{f.name}"] = LocalFile(f)
    results = bench / "results"
    if results.is_dir():
        for f in sorted(results.rglob("*")):
            if f.is_file() and not _skipped(f.relative_to(results)):
                version_files[f"benchmarks/results/{f.relative_to(results).as_posix()}"] = LocalFile(f)
    rows = [(v.name, v.backend, v.archs) for v in variants]
    rows += [(name, "cuda" if "-cu" in name else "cpu" if "-cpu-" in name else "", ()) for name in other_variants]
    package = variants[0].path if variants else config.package_dir
    rendered = card.render(project, config, repo_id, rows, package, plot_path=PLOT_PATH)
    main_files = {CARD_PATH: LocalFile(rendered.markdown.encode())}
    if rendered.plot_svg is not None:
        main_files[PLOT_PATH] = LocalFile(rendered.plot_svg.encode())
    return Upload(repo_id, config.version, branch, version_files, main_files, variants)


def _skipped(rel: Path) -> bool:
    return any(part in _SKIPPED_PARTS for part in rel.parts) or rel.name.endswith(_SKIPPED_SUFFIXES)


def diff_branch(branch: str, wanted: dict[str, LocalFile], remote: dict[str, RemoteFile],
                owned: Callable[[str], bool], exists: bool, base: str | None) -> BranchChange:
    """The additions and deletions that turn `remote` into what this publish wants on `branch`."""
    adds = [p for p, f in sorted(wanted.items()) if p not in remote or not remote[p].matches(f)]
    deletes = sorted(p for p in remote if owned(p) and p not in wanted)
    return BranchChange(branch, exists, base, adds, deletes)


def plan_changes(project: Path, built: list[BuiltVariant], repo_id: str, branch: str | None,
                 heads: dict[str, str], files_of: Callable[[str], dict[str, RemoteFile]]) -> tuple[Upload, list[BranchChange]]:
    """What to write to each branch, given the repository's branch heads and a way to list a commit's files.

    The version branch is `branch`, else build.toml's general.hub.branch, else v<general.version>.
    A missing version branch is planned as the Hub creates it: from main's head.
    """
    from . import project as project_stage

    vbranch = branch or _configured_branch(project) or f"v{project_stage.load(project).version}"
    exists = vbranch in heads
    base = heads.get(vbranch) if exists else heads.get("main")
    remote = files_of(base) if base else {}
    # Variants already on the branch that this publish does not replace stay there (on a new
    # branch, everything under build/ inherited from main is deleted instead).
    others = sorted({p.split("/")[1] for p in remote if p.startswith("build/") and p.count("/") >= 2}
                    - {v.name for v in built}) if exists else []
    upload = plan_upload(project, built, repo_id, vbranch, others)
    main_remote = files_of(heads["main"]) if "main" in heads else {}
    return upload, [
        diff_branch(vbranch, upload.version_files, remote, upload.owned(not exists), exists, base),
        diff_branch("main", upload.main_files, main_remote, lambda p: p == PLOT_PATH, "main" in heads,
                    heads.get("main")),
    ]


# -- targets ---------------------------------------------------------------------------------
def publish_local(project: Path, *, repo_id: str | None = None, branch: str | None = None,
                  variants: list[str] | None = None, dry_run: bool = False,
                  hub_dir: Path | None = None) -> PublishResult:
    """Publish the verified builds of `project` to the embedded repository `.hub/<org>/<name>`.

    Returns the result; `result.load_path` is the checkout of the version branch, which
    `LOCAL_KERNELS=<repo_id>=<load_path>` or `kernels.get_local_kernel(load_path)` loads.
    """
    from .localhub import LocalHub

    project = Path(project).resolve()
    repo_id = repo_id or _configured_repo_id(project)
    _check_repo_id(repo_id)
    built = collect_variants(project, variants)
    hub = LocalHub((hub_dir or project / HUB_DIR) / repo_id)
    heads = hub.branches()
    upload, changes = plan_changes(project, built, repo_id, branch, heads,
                                   lambda commit: {p: RemoteFile(e.blob) for p, e in hub.files(commit).items()})
    vbranch = upload.version_branch
    result = PublishResult("local", repo_id, upload.version, [v.name for v in built], "published", changes,
                           hub.checkout_path(vbranch), str(hub.git_dir), _dirty(built))
    if all(c.empty for c in changes):
        result.status = "no_changes"
        if not dry_run:
            hub.refresh_checkouts()
        return result
    if dry_run:
        result.status = "dry_run"
        return result
    hub.init()
    wanted = {vbranch: upload.version_files, "main": upload.main_files}
    updates = {}
    for c in changes:
        if c.empty:
            continue
        adds = {p: (wanted[c.branch][p].source, wanted[c.branch][p].executable) for p in c.adds}
        c.commit = hub.write_commit(c.base, adds, c.deletes, COMMIT_MESSAGE)
        updates[c.branch] = (heads.get(c.branch), c.commit)
    hub.move_refs(updates)
    hub.refresh_checkouts()
    for c in changes:
        c.url = str(hub.checkout_path(c.branch))
    return result


def publish_hub(project: Path, repo_id: str, *, branch: str | None = None, create_pr: bool = False,
                private: bool = False, dry_run: bool = False, variants: list[str] | None = None,
                token: str | None = None) -> PublishResult:
    """Publish the verified builds of `project` to the Hub repository `repo_id` (type `kernel`).

    The token comes from `token`, else HF_TOKEN or the user's `hf auth login`; HF_ENDPOINT
    selects another Hub. See the module docstring for what is written and why it is safe.
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    project = Path(project).resolve()
    _check_repo_id(repo_id)
    token = token or get_token()
    if not token and not dry_run:
        raise PipelineError(
            f"publishing to the Hub repository {repo_id} needs a token",
            fix="set HF_TOKEN or run `hf auth login`; or publish to the embedded repository with --local",
        )
    built = collect_variants(project, variants)
    _require_redistributable(built)
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token or False)
    web = f"{api.endpoint}/kernels/{repo_id}"
    try:
        if not dry_run and not create_pr:
            api.create_repo(repo_id, repo_type="kernel", private=private, exist_ok=True)
        try:
            heads = {b.name: b.target_commit for b in api.list_repo_refs(repo_id, repo_type="kernel").branches}
        except RepositoryNotFoundError:
            if create_pr:
                raise PipelineError(f"--create-pr: the Hub repository {repo_id} does not exist", where=web,
                                    fix="publish once without --create-pr, or ask its owner to create it") from None
            heads = {}
        upload, changes = plan_changes(project, built, repo_id, branch, heads,
                                       lambda commit: _hub_files(api, repo_id, commit))
        vbranch = upload.version_branch
        if create_pr and vbranch not in heads:
            raise PipelineError(f"--create-pr: branch {vbranch} does not exist in {repo_id}", where=web,
                                fix=f"ask the repository owner to create branch {vbranch}, or publish without --create-pr")
        result = PublishResult("hub", repo_id, upload.version, [v.name for v in built], "published", changes,
                               location=web, dirty_variants=_dirty(built))
        if all(c.empty for c in result.branches):
            result.status = "no_changes"
            return result
        if dry_run:
            result.status = "dry_run"
            return result
        wanted = {vbranch: upload.version_files, "main": upload.main_files}
        for change in result.branches:
            if not change.empty:
                _commit_hub(api, repo_id, change, wanted[change.branch], create_pr)
        if create_pr:
            result.status = "pull_request"
    except HfHubHTTPError as err:
        raise PipelineError(f"the Hub refused the publish to {repo_id}: {_scrub(str(err), token)}", where=web,
                            fix="check the repository id and that the token may write to it "
                                "(a 403 on a new kernel repository means the namespace needs publishing approval)"
                            ) from None
    return result


def _require_redistributable(built: list[BuiltVariant]) -> None:
    """Refuse native libraries that need a newer glibc than manylinux_2_28: users' machines can't load them."""
    from kernel_abi_check import ObjectFile

    from .check import MANYLINUX

    for variant in built:
        for lib in sorted(variant.path.rglob("*.so")):
            violations = ObjectFile(str(lib)).check_manylinux(MANYLINUX)
            if violations:
                first = violations[0]
                raise PipelineError(
                    f"{variant.name} is a local build, not redistributable: {lib.name} needs "
                    f"{first.dep} {first.version} ({first.name}), newer than {MANYLINUX} allows",
                    where=str(lib),
                    fix="build release variants with `flash-attn-kernel build --redistributable` on a manylinux_2_28 "
                        "host (the release workflow's container), or publish this build to the embedded repository")


def _dirty(built: list[BuiltVariant]) -> list[str]:
    """Variants built from a working tree with uncommitted changes (their uid ends in `_dirty`)."""
    return [v.name for v in built if v.uid.endswith("_dirty")]


def _hub_files(api, repo_id: str, commit: str) -> dict[str, RemoteFile]:
    from huggingface_hub.hf_api import RepoFile

    files = {}
    for entry in api.list_repo_tree(repo_id, repo_type="kernel", revision=commit, recursive=True):
        if isinstance(entry, RepoFile):
            files[entry.path] = RemoteFile(entry.blob_id, entry.lfs.sha256 if entry.lfs else None)
    return files


def _commit_hub(api, repo_id: str, change: BranchChange, wanted: dict[str, LocalFile], create_pr: bool) -> None:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    ops = [CommitOperationDelete(p) for p in change.deletes]
    ops += [CommitOperationAdd(p, wanted[p].source if isinstance(wanted[p].source, bytes) else str(wanted[p].source))
            for p in change.adds]
    batches = [ops[i:i + MAX_OPERATIONS_PER_COMMIT] for i in range(0, len(ops), MAX_OPERATIONS_PER_COMMIT)]
    created = False
    if not change.exists:
        api.create_branch(repo_id, branch=change.branch, revision=change.base, repo_type="kernel")
        created = True
    parent, revision = change.base, change.branch
    try:
        for i, batch in enumerate(batches):
            message = COMMIT_MESSAGE if len(batches) == 1 else f"{COMMIT_MESSAGE} (batch {i + 1}/{len(batches)})"
            # With --create-pr, the first batch opens the pull request and later ones extend it.
            opens_pr = create_pr and i == 0
            info = api.create_commit(repo_id, batch, commit_message=message, repo_type="kernel",
                                     revision=revision, create_pr=opens_pr, parent_commit=parent)
            parent = info.oid
            change.commit = info.oid
            if opens_pr:
                revision, change.url = info.pr_revision, info.pr_url
            elif not create_pr:
                change.url = f"{api.endpoint}/kernels/{repo_id}/tree/{change.branch}"
    except BaseException:
        if created and change.commit is None:
            # Leave no empty version branch behind: the loader would resolve it and find nothing.
            api.delete_branch(repo_id, branch=change.branch, repo_type="kernel")
        raise


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _check_repo_id(repo_id: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo_id or ""):
        raise PipelineError(f"--repo-id {repo_id!r} is not ORG/NAME", fix="pass --repo-id <org>/flash-attn")


def _configured_repo_id(project: Path) -> str:
    """build.toml's general.hub.repo-id, else `<placeholder org>/<name>`."""
    import tomllib

    general = tomllib.loads((project / "build.toml").read_text())["general"]
    return general.get("hub", {}).get("repo-id") or f"{PLACEHOLDER_ORG}/{general['name']}"


def _configured_branch(project: Path) -> str | None:
    import tomllib

    general = tomllib.loads((project / "build.toml").read_text())["general"]
    return general.get("hub", {}).get("branch")


# -- command line ------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo-id", metavar="ORG/NAME",
                        help="Hub repository (default: build.toml's general.hub.repo-id). Without --repo-id, the "
                             "Hub is used only when a token is available and that id is not the your-org/ "
                             "placeholder; otherwise publish goes to the embedded repository")
    parser.add_argument("--branch", metavar="B", help="version branch (default: general.hub.branch, else v<version>)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request per branch instead of committing")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--dry-run", action="store_true", help="list every file that would be added or deleted, per branch")
    parser.add_argument("--local", action="store_true", help="publish to the embedded repository .hub/<org>/<name>")
    parser.add_argument("--variant", action="append", metavar="NAME",
                        help="publish only this build/<variant> (repeatable; default: all)")
    parser.add_argument("--output-json", metavar="PATH", help="also write the result as JSON to PATH")


def run(args: argparse.Namespace) -> int:
    from huggingface_hub import get_token

    project = Path(args.project).resolve()
    branch = args.branch
    repo_id = args.repo_id or _configured_repo_id(project)
    placeholder = repo_id.startswith(PLACEHOLDER_ORG + "/")
    if args.local or (not args.repo_id and (placeholder or not get_token())):
        if args.create_pr:
            raise PipelineError("--create-pr needs a Hub repository; the embedded repository has no pull requests",
                                fix="pass --repo-id ORG/NAME with a token, or drop --create-pr")
        result = publish_local(project, repo_id=repo_id, branch=branch, variants=args.variant, dry_run=args.dry_run)
    else:
        result = publish_hub(project, repo_id, branch=branch, create_pr=args.create_pr, private=args.private,
                             dry_run=args.dry_run, variants=args.variant)
    _report(result, args.dry_run)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(_as_json(result), indent=2) + "\n")
    return 0


def _report(result: PublishResult, listing: bool) -> None:
    out = sys.stdout
    where = "embedded repository" if result.target == "local" else "Hub repository"
    print(f"publish: {len(result.variants)} variant(s) of v{result.version} -> {where} {result.repo_id}", file=out)
    for v in result.variants:
        print(f"  {v}", file=out)
    if result.dirty_variants:
        print(f"warning: {', '.join(result.dirty_variants)} built from uncommitted sources (uid ends in _dirty); "
              "commit and rebuild for a release anyone can reproduce", file=sys.stderr)
    if result.status == "no_changes":
        print(f"nothing to publish: {result.location} already holds this build (no commit made)", file=out)
    for c in result.branches:
        state = "" if c.exists else " (new branch)"
        print(f"branch {c.branch}{state}: {len(c.adds)} to add, {len(c.deletes)} to delete", file=out)
        if listing:
            for p in c.adds:
                print(f"  + {p}", file=out)
            for p in c.deletes:
                print(f"  - {p}", file=out)
    if result.status == "dry_run":
        print("dry run: nothing was written", file=out)
        return
    for c in result.branches:
        if c.url:
            print(f"wrote {c.branch}: {c.url}", file=out)
    if result.target == "local":
        print(f"load it: LOCAL_KERNELS={result.repo_id}={result.load_path} with "
              f"kernels.get_kernel({result.repo_id!r}, version={result.version})", file=out)
        print(f"inspect it: git --git-dir {result.location} log --stat {result.branches[0].branch}", file=out)
    else:
        print(f"load it: kernels.get_kernel({result.repo_id!r}, version={result.version})", file=out)


def _as_json(result: PublishResult) -> dict:
    return {
        "status": result.status,
        "target": result.target,
        "repo_id": result.repo_id,
        "version": result.version,
        "variants": result.variants,
        "location": result.location,
        "load_path": str(result.load_path) if result.load_path else None,
        "branches": [{"branch": c.branch, "new": not c.exists, "commit": c.commit, "url": c.url,
                      "added": c.adds, "deleted": c.deletes} for c in result.branches],
    }
