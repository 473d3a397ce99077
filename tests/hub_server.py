"""A local Hugging Face Hub look-alike for tests: just the endpoints publishing and loading kernels use.

`huggingface_hub` (HfApi) and the `kernels` loader talk to it unchanged when HF_ENDPOINT points at it.
It keeps repositories in memory as a commit graph of whole-tree snapshots, and implements:

- POST /api/repos/create                                  (create_repo; 409 when it exists)
- GET  /api/{type}s/{id}[/revision/{rev}]                 (repo_info / kernel_info, used by snapshot_download)
- GET  /api/{type}s/{id}/refs                              (list_repo_refs: `get_kernel(version=N)` resolves branch vN)
- POST/DELETE /api/{type}s/{id}/branch/{branch}            (create_branch / delete_branch)
- POST /api/{type}s/{id}/preupload/{rev}                   (every file is a regular upload, so no LFS/xet endpoint is needed)
- POST /api/{type}s/{id}/commit/{rev}[?create_pr=1]        (ndjson: header, file, deletedFile, deletedFolder)
- GET  /api/{type}s/{id}/tree/{rev}[/{path}]               (list_repo_tree, recursive or not)
- POST /api/{type}s/{id}/paths-info/{rev}                  (get_paths_info)
- HEAD/GET /{prefix}{id}/resolve/{rev}/{path}              (hf_hub_download)
- POST /api/validate-yaml                                  (create_commit validates README.md front matter)
- GET  /api/organizations/{org}/overview                   (the loader's `trustedKernelPublisher` check)

Writes need a bearer token; `HubServer.tokens_seen` records which ones arrived, so tests can check the
token travelled in the Authorization header and nowhere else. `fail_commits_on` makes commits to a
branch fail with HTTP 500, to test interrupted publishes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# URL prefix of each repository type, as in huggingface_hub.constants.REPO_TYPES_URL_PREFIXES.
PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}
_API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel"}


def blob_id(content: bytes) -> str:
    """Git's blob id of `content`: what the Hub reports as a regular file's `oid`."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    """A snapshot of a whole repository tree."""

    oid: str
    files: dict[str, bytes]
    parent: str | None
    message: str


@dataclass
class Repo:
    """One repository: commits by id, branches and pull-request refs to commit ids."""

    repo_type: str
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    pulls: dict[int, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        if rev in self.branches:
            return self.commits[self.branches[rev]]
        m = re.fullmatch(r"refs/pr/(\d+)", rev)
        if m and int(m.group(1)) in self.pulls:
            return self.commits[self.pulls[int(m.group(1))]]
        return self.commits.get(rev)

    def add_commit(self, files: dict[str, bytes], parent: str | None, message: str) -> Commit:
        digest = hashlib.sha1(repr((sorted((p, blob_id(c)) for p, c in files.items()), parent, message,
                                    time.time_ns())).encode()).hexdigest()
        commit = Commit(digest, dict(files), parent, message)
        self.commits[digest] = commit
        return commit


class HubServer:
    """Runs the fake Hub on 127.0.0.1 in a background thread; use as a context manager."""

    def __init__(self, trusted_orgs: set[str] | None = None):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.trusted_orgs = trusted_orgs if trusted_orgs is not None else set()
        self.tokens_seen: set[str] = set()
        self.requests: list[str] = []
        self.fail_commits_on: set[str] = set()
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def repo(self, repo_id: str, repo_type: str = "kernel") -> Repo:
        """The stored repository (KeyError when it does not exist)."""
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, rev: str, repo_type: str = "kernel") -> dict[str, bytes]:
        """The files of `rev` (a branch or commit id) of a stored repository."""
        commit = self.repo(repo_id, repo_type).resolve(rev)
        if commit is None:
            raise KeyError(rev)
        return dict(commit.files)


class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}


def _make_handler(server: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 - the base class's signature
            pass  # requests are recorded in server.requests instead of stderr

        # -- plumbing -------------------------------------------------------------------
        def _dispatch(self, method: str) -> None:
            url = urlsplit(self.path)
            path = unquote(url.path)
            query = parse_qs(url.query)
            server.requests.append(f"{method} {url.path}")
            auth = self.headers.get("Authorization", "")
            if auth.startswith("Bearer "):
                server.tokens_seen.add(auth[len("Bearer "):])
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            try:
                with server.lock:
                    status, payload, headers = self._route(method, url.path, path, query, body, bool(auth))
            except _HttpError as err:
                status, headers = err.status, dict(err.headers)
                payload = {"error": err.message, **err.extra}
                if err.code:
                    headers["X-Error-Code"] = err.code
            self._send(method, status, payload, headers)

        def _send(self, method: str, status: int, payload, headers: dict) -> None:
            if isinstance(payload, bytes):
                data, ctype = payload, "application/octet-stream"
            else:
                data, ctype = json.dumps(payload).encode(), "application/json"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(int(headers.pop("_length", len(data)))))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(data)

        def do_GET(self):  # noqa: N802 - http.server's naming
            self._dispatch("GET")

        def do_HEAD(self):  # noqa: N802
            self._dispatch("HEAD")

        def do_POST(self):  # noqa: N802
            self._dispatch("POST")

        def do_DELETE(self):  # noqa: N802
            self._dispatch("DELETE")

        # -- routes ---------------------------------------------------------------------
        def _route(self, method, raw_path, path, query, body, authed):
            base = server.endpoint
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo(json.loads(body), authed)
            if method == "POST" and path == "/api/validate-yaml":
                return 200, {"errors": [], "warnings": []}, {}
            m = re.fullmatch(r"/api/organizations/([^/]+)/overview", path)
            if m and method == "GET":
                org = m.group(1)
                return 200, {"name": org, "fullname": org, "avatarUrl": "", "isVerified": False,
                             "trustedKernelPublisher": org in server.trusted_orgs}, {}
            m = re.fullmatch(r"/api/(models|datasets|spaces|kernels)/([^/]+/[^/]+)(/.*)?", path)
            if m:
                repo = self._repo(_API_TYPES[m.group(1)], m.group(2))
                return self._api(method, repo, m.group(3) or "", raw_path, query, body, authed, base)
            m = re.fullmatch(r"/(datasets/|spaces/|kernels/)?([^/]+/[^/]+)/resolve/(.*)", raw_path)
            if m and method in ("GET", "HEAD"):
                repo_type = {v: k for k, v in PREFIXES.items()}[m.group(1) or ""]
                return self._resolve(self._repo(repo_type, m.group(2)), m.group(3))
            raise _HttpError(404, f"no route for {method} {path}")

        def _repo(self, repo_type: str, repo_id: str) -> Repo:
            repo = server.repos.get((repo_type, repo_id))
            if repo is None:
                raise _HttpError(404, f"Repository not found: {repo_id}", "RepoNotFound")
            return repo

        def _commit(self, repo: Repo, rev: str) -> Commit:
            commit = repo.resolve(rev)
            if commit is None:
                raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return commit

        def _create_repo(self, payload: dict, authed: bool):
            if not authed:
                raise _HttpError(401, "Invalid credentials in Authorization header")
            repo_type = payload.get("type") or "model"
            repo_id = f"{payload['organization']}/{payload['name']}"
            url = f"{server.endpoint}/{PREFIXES[repo_type]}{repo_id}"
            if (repo_type, repo_id) in server.repos:
                # The Hub answers a conflict with the existing repository's URL, which create_repo(exist_ok=True) returns.
                raise _HttpError(409, f"You already created this {repo_type} repo", extra={"url": url})
            repo = Repo(repo_type, repo_id, payload.get("visibility") == "private")
            first = repo.add_commit({".gitattributes": b"*.so filter=lfs diff=lfs merge=lfs -text\n"}, None,
                                    "initial commit")
            repo.branches["main"] = first.oid
            server.repos[(repo_type, repo_id)] = repo
            return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

        def _api(self, method, repo: Repo, rest: str, raw_path, query, body, authed, base):
            if method in ("POST", "DELETE") and not authed:
                raise _HttpError(401, "Invalid credentials in Authorization header")
            m = re.fullmatch(r"(?:/revision/(.+))?", rest)
            if m and method == "GET":
                commit = self._commit(repo, unquote(m.group(1) or "main"))
                return 200, {"id": repo.repo_id, "sha": commit.oid, "private": repo.private,
                             "siblings": [{"rfilename": p} for p in sorted(commit.files)]}, {}
            if rest == "/refs" and method == "GET":
                branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c}
                            for b, c in sorted(repo.branches.items())]
                out = {"branches": branches, "tags": [], "converts": []}
                if query.get("include_prs"):
                    out["pullRequests"] = [{"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": c}
                                           for n, c in sorted(repo.pulls.items())]
                return 200, out, {}
            m = re.fullmatch(r"/branch/(.+)", rest)
            if m:
                return self._branch(method, repo, m.group(1), body)
            m = re.fullmatch(r"/preupload/(.+)", rest)
            if m and method == "POST":
                commit = self._commit(repo, m.group(1))
                files = json.loads(body)["files"]
                return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                        "oid": blob_id(commit.files[f["path"]]) if f["path"] in commit.files
                                        else None} for f in files], "commitOid": commit.oid}, {}
            m = re.fullmatch(r"/commit/(.+)", rest)
            if m and method == "POST":
                return self._do_commit(repo, m.group(1), body, bool(query.get("create_pr")), base)
            m = re.fullmatch(r"/tree/([^/]+)(?:/(.*))?", rest)
            if m and method == "GET":
                recursive = query.get("recursive", ["False"])[0].lower() in ("1", "true")
                return 200, self._tree(self._commit(repo, m.group(1)), m.group(2) or "", recursive), {}
            m = re.fullmatch(r"/paths-info/(.+)", rest)
            if m and method == "POST":
                commit = self._commit(repo, m.group(1))
                paths = parse_qs(body.decode())["paths"]
                return 200, [e for p in paths for e in self._entries(commit, p.strip("/"))], {}
            raise _HttpError(404, f"no route for {method} {rest}")

        def _branch(self, method, repo: Repo, branch: str, body: bytes):
            if method == "DELETE":
                if branch not in repo.branches:
                    raise _HttpError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                del repo.branches[branch]
                return 200, {}, {}
            if branch in repo.branches:
                raise _HttpError(409, f"Reference already exists: refs/heads/{branch}")
            start = (json.loads(body) if body else {}).get("startingPoint") or "main"
            repo.branches[branch] = self._commit(repo, start).oid
            return 200, {}, {}

        def _do_commit(self, repo: Repo, rev: str, body: bytes, create_pr: bool, base: str):
            rev = unquote(rev)
            if rev in server.fail_commits_on:
                raise _HttpError(500, f"injected failure committing to {rev}")
            head = self._commit(repo, rev)
            if not create_pr and rev not in repo.branches:
                raise _HttpError(400, f"Invalid rev id: {rev} is not a branch", "RevisionNotFound")
            files = dict(head.files)
            summary = "commit"
            for line in body.splitlines():
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    summary = value["summary"]
                    parent = value.get("parentCommit")
                    if parent and not head.oid.startswith(parent):
                        raise _HttpError(412, f"parent commit {parent} is not the head of {rev}")
                elif key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise _HttpError(404, f"A file with this name doesn't exist: {value['path']}",
                                         "EntryNotFound")
                    del files[value["path"]]
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: c for p, c in files.items() if not p.startswith(prefix)}
                else:
                    raise _HttpError(400, f"unsupported commit operation {key!r} (this server takes regular files)")
            commit = repo.add_commit(files, head.oid, summary)
            url_base = f"{base}/{PREFIXES[repo.repo_type]}{repo.repo_id}"
            if create_pr:
                number = max(repo.pulls, default=0) + 1
                repo.pulls[number] = commit.oid
                return 200, {"success": True, "commitOid": commit.oid, "commitUrl": f"{url_base}/commit/{commit.oid}",
                             "pullRequestUrl": f"{url_base}/discussions/{number}"}, {}
            repo.branches[rev] = commit.oid
            return 200, {"success": True, "commitOid": commit.oid, "commitUrl": f"{url_base}/commit/{commit.oid}"}, {}

        @staticmethod
        def _entries(commit: Commit, path: str) -> list[dict]:
            if path in commit.files:
                content = commit.files[path]
                return [{"type": "file", "path": path, "size": len(content), "oid": blob_id(content)}]
            if any(p.startswith(path + "/") for p in commit.files):
                return [{"type": "directory", "path": path, "size": 0,
                         "oid": hashlib.sha1(f"{commit.oid}:{path}".encode()).hexdigest()}]
            return []

        def _tree(self, commit: Commit, path: str, recursive: bool) -> list[dict]:
            prefix = path.strip("/") + "/" if path.strip("/") else ""
            below = [p for p in commit.files if p.startswith(prefix)]
            if prefix and not below:
                raise _HttpError(404, f"Entry not found: {path}", "EntryNotFound")
            names: set[str] = set()
            for p in below:
                parts = p[len(prefix):].split("/")
                depth = len(parts) if recursive else 1
                for i in range(1, depth + 1):
                    names.add(prefix + "/".join(parts[:i]))
            return [e for name in sorted(names) for e in self._entries(commit, name)]

        def _resolve(self, repo: Repo, rest: str):
            # The revision may itself contain slashes only when URL-encoded, so split on the first one.
            rev, _, file_path = rest.partition("/")
            commit = self._commit(repo, unquote(rev))
            file_path = unquote(file_path)
            headers = {"X-Repo-Commit": commit.oid}
            if file_path not in commit.files:
                raise _HttpError(404, f"Entry not found: {file_path}", "EntryNotFound", headers)
            content = commit.files[file_path]
            headers["ETag"] = f'"{blob_id(content)}"'
            return 200, content, headers

    return Handler
