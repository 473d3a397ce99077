"""The embedded kernel repository: a Hub-shaped git repository under the project's `.hub/`.

`flash-attn-kernel publish` writes here when no Hub repository and token are given. Layout of
`.hub/<org>/<name>/`:

    repo.git/            bare git repository with the Hub's branches: `main` (README.md) and `v<N>`
                         (build/<variant>/..., benchmarks/). Inspect it with git, e.g.
                         `git --git-dir .hub/<org>/<name>/repo.git log --stat v1`.
    v1 -> checkouts/<commit>
                         a read-only checkout of branch v1, one per branch. This is what the loader
                         reads: LOCAL_KERNELS=<org>/<name>=.hub/<org>/<name>/v1 with
                         get_kernel("<org>/<name>", version=1), or get_local_kernel(Path(".hub/<org>/<name>/v1")).
    checkouts/<commit>/  the exported trees those links point at.

Atomicity: a publish first writes every blob, tree and commit object, which changes nothing a
reader sees; then it moves all branch refs in one `git update-ref --stdin` transaction (git locks
every ref, then commits them together, or none). The checkouts are derived from the refs: each is
exported to a new directory and its branch link swapped with an atomic rename, so a reader sees
either the old or the new tree, never a half-written one; a publish interrupted after the refs
moved leaves stale links that the next publish (even one with nothing to commit) refreshes.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import PipelineError

ZERO_OID = "0" * 40
# Fixed identity so publishing never depends on (or fails for lack of) a user's git config.
_GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "flash-attn-kernel",
    "GIT_AUTHOR_EMAIL": "flash-attn-kernel@localhost",
    "GIT_COMMITTER_NAME": "flash-attn-kernel",
    "GIT_COMMITTER_EMAIL": "flash-attn-kernel@localhost",
}


@dataclass(frozen=True)
class TreeEntry:
    """A file in a commit: git mode ("100644"/"100755") and blob id."""

    mode: str
    blob: str


class LocalHub:
    """One embedded kernel repository rooted at `.hub/<org>/<name>`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.git_dir = self.root / "repo.git"

    # -- reading ------------------------------------------------------------------------
    def exists(self) -> bool:
        """Whether the git store has been created."""
        return (self.git_dir / "HEAD").is_file()

    def branches(self) -> dict[str, str]:
        """Branch name -> commit id (empty before the first publish)."""
        if not self.exists():
            return {}
        out = self._git("for-each-ref", "--format=%(refname:short) %(objectname)", "refs/heads/")
        return dict(line.split(" ", 1) for line in out.splitlines() if line)

    def files(self, commit: str) -> dict[str, TreeEntry]:
        """Path -> entry for every file in `commit` (a branch name or commit id)."""
        out = self._git("ls-tree", "-r", "-z", "--full-tree", commit)
        entries = {}
        for record in out.split("\0"):
            if record:
                meta, path = record.split("\t", 1)
                mode, _, blob = meta.split(" ")
                entries[path] = TreeEntry(mode, blob)
        return entries

    def checkout_path(self, branch: str) -> Path:
        """Where the checkout of `branch` is linked (what LOCAL_KERNELS points at)."""
        return self.root / branch.replace("/", "-")

    # -- writing ------------------------------------------------------------------------
    def init(self) -> None:
        """Create the bare git store if it does not exist yet."""
        if self.exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "init", "-q", "--bare", "--initial-branch=main", str(self.git_dir)],
                       check=True, capture_output=True)

    def write_commit(self, parent: str | None, adds: dict[str, tuple[Path | bytes, bool]], deletes: list[str],
                     message: str) -> str:
        """Write the objects of a commit on top of `parent` and return its id; no ref moves.

        `adds` maps a path in the repository to (a file to read or the content itself, executable);
        `deletes` lists paths to drop.
        """
        files = [p for p, (src, _) in adds.items() if isinstance(src, Path)]
        # One git process hashes every file, streaming it from disk (builds can be large).
        hashed = self._git("hash-object", "-w", "--stdin-paths",
                           input="".join(f"{adds[p][0]}\n" for p in files)).split() if files else []
        blobs = dict(zip(files, hashed))
        blobs.update({p: self._hash_blob(src) for p, (src, _) in adds.items() if isinstance(src, bytes)})
        with tempfile.TemporaryDirectory(prefix="index-") as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            if parent:
                self._git("read-tree", parent, env=env)
            else:
                self._git("read-tree", "--empty", env=env)
            lines = [f"0 {ZERO_OID}\t{path}" for path in deletes]
            lines += [f"{'100755' if adds[p][1] else '100644'} {blobs[p]}\t{p}" for p in sorted(adds)]
            if lines:
                self._git("update-index", "--index-info", input="\n".join(lines) + "\n", env=env)
            tree = self._git("write-tree", env=env).strip()
        parents = ["-p", parent] if parent else []
        return self._git("commit-tree", tree, *parents, "-m", message, env=_GIT_IDENTITY).strip()

    def move_refs(self, updates: dict[str, tuple[str | None, str]]) -> None:
        """Move branches atomically: branch -> (expected old commit or None for a new branch, new commit).

        Fails without moving anything when any branch is not where the caller expects it
        (someone published in between).
        """
        lines = ["start"]
        for branch, (old, new) in sorted(updates.items()):
            lines.append(f"update refs/heads/{branch} {new} {old or ZERO_OID}")
        lines += ["prepare", "commit"]
        try:
            self._git("update-ref", "--stdin", input="\n".join(lines) + "\n")
        except subprocess.CalledProcessError as err:
            raise PipelineError(
                f"could not move the branches of {self.git_dir}: {err.stderr.strip()}",
                where=str(self.git_dir),
                fix="another publish changed the repository meanwhile; run publish again",
            ) from None

    def refresh_checkouts(self) -> dict[str, Path]:
        """Export every branch's tree and point its link at it; return branch -> link path."""
        checkouts = self.root / "checkouts"
        checkouts.mkdir(exist_ok=True)
        links = {}
        for branch, commit in self.branches().items():
            target = checkouts / commit
            if not target.is_dir():
                self._export(commit, target)
            link = self.checkout_path(branch)
            tmp_link = link.with_name(f".{link.name}.tmp")
            if tmp_link.is_symlink():
                tmp_link.unlink()
            os.symlink(Path("checkouts") / commit, tmp_link)
            os.replace(tmp_link, link)  # atomic: readers see the old or the new checkout
            links[branch] = link
        live = {os.readlink(p) for p in links.values()}
        for old in checkouts.iterdir():
            if str(Path("checkouts") / old.name) not in live:
                shutil.rmtree(old, ignore_errors=True)
        return links

    # -- helpers ------------------------------------------------------------------------
    def _export(self, commit: str, target: Path) -> None:
        data = subprocess.run(["git", "--git-dir", str(self.git_dir), "archive", "--format=tar", commit],
                              check=True, capture_output=True).stdout
        staging = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(staging, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        os.replace(staging, target)

    def _hash_blob(self, content: bytes) -> str:
        return self._git("hash-object", "-w", "--stdin", input=content).strip()

    def _git(self, *args: str, input: str | bytes | None = None, env: dict[str, str] | None = None) -> str:
        text = not isinstance(input, bytes)
        proc = subprocess.run(
            ["git", "--git-dir", str(self.git_dir), *args],
            input=input,
            capture_output=True,
            text=text,
            env={**os.environ, **(env or {})},
            check=True,
        )
        return proc.stdout if text else proc.stdout.decode()
