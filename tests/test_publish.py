"""Publishing: the embedded repository, the Hub (through tests/hub_server.py) and loading back with `kernels`.

Every test publishes a copy of the real CPU build (conftest's `built_cpu_variant`); fake variants
(a pure-Python package with a real metadata.json and digest) stand in for the CUDA builds and
for the broken builds publishing must refuse.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from flash_attn_kernel import publish
from flash_attn_kernel.errors import PipelineError
from flash_attn_kernel.localhub import LocalHub

from hub_server import HubServer

ROOT = Path(__file__).resolve().parents[1]
ORG = "test-org"
REPO_ID = f"{ORG}/flash-attn"
TOKEN = "hf_testtoken_0123456789abcdef"

FAKE_INIT = '''"""A fake flash-attn build for publishing tests: SDPA behind flash-attn's API."""
import torch

__all__ = ["flash_attn_func"]


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """Attention over (batch, seqlen, heads, head_dim) tensors."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2)
'''

BENCH_RUN = {
    "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "cuda": "13.0", "date": "2026-11-20T10:00:00Z",
    "command": "flash-attn-kernel bench", "git": "abc",
    "records": [
        {"impl": "flash-attn-kernel[sm90]", "op": "fwd", "dtype": "bf16", "batch": 2, "seqlen_q": 8192,
         "seqlen_k": 8192, "heads_q": 16, "heads_kv": 16, "hdim": 128, "causal": False, "ms": 1.5,
         "tflops": 612.3, "gbps": None, "peak_mem_bytes": 1},
        {"impl": "sdpa-flash", "op": "fwd", "dtype": "bf16", "batch": 2, "seqlen_q": 8192,
         "seqlen_k": 8192, "heads_q": 16, "heads_kv": 16, "hdim": 128, "causal": False, "ms": 2.0,
         "tflops": 459.2, "gbps": None, "peak_mem_bytes": 1},
    ],
}


def host_cpu_variant() -> str:
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"torch{major}{minor}-cxx11-cpu-x86_64-linux"


def write_digest(variant: Path) -> None:
    """Re-hash a variant into its metadata.json, as the builder's check does."""
    from kernels._rust import Digest, DigestAlgorithm

    meta_path = variant / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["digest"] = {"algorithm": "sha256", "files": Digest.hash_variant(DigestAlgorithm.SHA256, variant).files}
    meta_path.write_text(json.dumps(meta, indent=2))


def make_fake_variant(build: Path, name: str, *, uid: str = "abc1234", version: int = 1, backend: str = "cpu",
                      digest: bool = True) -> Path:
    variant = build / name
    variant.mkdir(parents=True)
    (variant / "__init__.py").write_text(FAKE_INIT)
    meta = {"name": "flash-attn", "id": f"_flash_attn_{backend}_{uid}", "version": version,
            "license": "BSD-3-Clause", "python-depends": [], "backend": {"type": backend}}
    (variant / "metadata.json").write_text(json.dumps(meta))
    if digest:
        write_digest(variant)
    return variant


@pytest.fixture
def project(tmp_path: Path, built_cpu_variant: Path) -> Path:
    """A kernel project with this repository's build.toml, the real CPU build and recorded benchmarks."""
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(ROOT / "build.toml", proj / "build.toml")
    shutil.copytree(built_cpu_variant, proj / "build" / built_cpu_variant.name,
                    ignore=shutil.ignore_patterns("__pycache__"))
    results = proj / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "h100-2026-11-20.json").write_text(json.dumps(BENCH_RUN))
    (proj / "benchmarks" / "benchmark_attention.py").write_text("# benchmark script\n")
    return proj


@pytest.fixture
def hub(monkeypatch, tmp_path) -> HubServer:
    """The fake Hub, with HF_ENDPOINT and a token in the environment and a private HF_HOME."""
    with HubServer(trusted_orgs={ORG}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield server


def only_variant(proj: Path) -> Path:
    (variant,) = (proj / "build").iterdir()
    return variant


def run_cli(proj: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flash_attn_kernel", "--project", str(proj), "publish", *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=ROOT)


LOAD_AND_CALL = r"""
import sys, torch, kernels
fa = kernels.get_kernel(sys.argv[1], version=1, backend="cpu")
q, k, v = (torch.randn(1, 16, 2, 64, dtype=torch.bfloat16) for _ in range(3))
out = fa.flash_attn_func(q, k, v, causal=True)
out = out[0] if isinstance(out, tuple) else out
ref = torch.nn.functional.scaled_dot_product_attention(
    q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2), is_causal=True).transpose(1, 2)
assert out.shape == q.shape, out.shape
assert (out.float() - ref).abs().max().item() < 3e-2
print("LOADED", fa.__name__, fa.__file__)
"""


def load_in_fresh_process(env: dict) -> str:
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_CALL, REPO_ID], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# -- embedded repository ---------------------------------------------------------------------------
def test_publish_local_then_load_with_kernels(project: Path):
    result = publish.publish_local(project, repo_id=REPO_ID)
    assert result.status == "published"
    assert result.load_path == project / ".hub" / REPO_ID / "v1"
    variant = only_variant(project).name
    hub = LocalHub(project / ".hub" / REPO_ID)
    assert set(hub.branches()) == {"main", "v1"}
    v1 = hub.files("v1")
    assert f"build/{variant}/metadata.json" in v1
    assert "benchmarks/results/h100-2026-11-20.json" in v1 and "benchmarks/benchmark_attention.py" in v1
    assert set(hub.files("main")) == {"README.md", "media/benchmarks.svg"}
    out = load_in_fresh_process({"LOCAL_KERNELS": f"{REPO_ID}={result.load_path}", "HF_HUB_OFFLINE": "1"})
    assert f"{result.load_path}/build/{variant}/__init__.py" in out
    # get_local_kernel reads the same checkout.
    proc = subprocess.run([sys.executable, "-c", "import sys, kernels; from pathlib import Path; "
                           "print(kernels.get_local_kernel(Path(sys.argv[1]), backend='cpu').__name__)",
                           str(result.load_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_republishing_the_same_build_is_a_no_op(project: Path):
    publish.publish_local(project, repo_id=REPO_ID)
    hub = LocalHub(project / ".hub" / REPO_ID)
    before = hub.branches()
    proc = run_cli(project, "--local", "--repo-id", REPO_ID)
    assert proc.returncode == 0, proc.stderr
    assert "nothing to publish" in proc.stdout
    assert hub.branches() == before


def test_stale_files_are_deleted_and_other_variants_kept(project: Path):
    variant = only_variant(project)
    (variant / "old_helper.py").write_text("x = 1\n")
    write_digest(variant)
    other = make_fake_variant(project / "build", "torch-stable-abi211-cu130-x86_64-linux", backend="cuda",
                              uid=json.loads((variant / "metadata.json").read_text())["id"].rsplit("_cpu_", 1)[1])
    publish.publish_local(project, repo_id=REPO_ID)
    (variant / "old_helper.py").unlink()
    write_digest(variant)
    result = publish.publish_local(project, repo_id=REPO_ID, variants=[variant.name])
    v1 = result.branches[0]
    assert v1.deletes == [f"build/{variant.name}/old_helper.py"]
    files = LocalHub(project / ".hub" / REPO_ID).files("v1")
    assert f"build/{variant.name}/old_helper.py" not in files
    assert f"build/{other.name}/__init__.py" in files  # not part of this publish: left alone
    assert f"| `{other.name}` | cuda |" in (result.load_path.parent / "main" / "README.md").read_text()
    assert not (result.load_path / "build" / variant.name / "old_helper.py").exists()


def test_interrupted_local_publish_leaves_the_repository_unchanged(project: Path, monkeypatch):
    first = publish.publish_local(project, repo_id=REPO_ID)
    hub = LocalHub(project / ".hub" / REPO_ID)
    before = hub.branches()
    link_before = os.readlink(first.load_path)
    variant = only_variant(project)
    (variant / "new_module.py").write_text("y = 2\n")
    write_digest(variant)
    # A newer benchmark run changes the card too, so both branches get a commit.
    (project / "benchmarks" / "results" / "later.json").write_text(json.dumps({**BENCH_RUN, "date": "2026-11-21"}))

    calls = []
    real_write_commit = LocalHub.write_commit

    def failing_write_commit(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the version branch's commit exists, the card's does not
            raise KeyboardInterrupt
        return real_write_commit(self, *args, **kwargs)

    monkeypatch.setattr(LocalHub, "write_commit", failing_write_commit)
    with pytest.raises(KeyboardInterrupt):
        publish.publish_local(project, repo_id=REPO_ID)
    assert len(calls) == 2
    assert hub.branches() == before
    assert os.readlink(first.load_path) == link_before
    assert not (first.load_path / "build" / variant.name / "new_module.py").exists()
    monkeypatch.undo()
    assert publish.publish_local(project, repo_id=REPO_ID).status == "published"


def test_dry_run_lists_every_file_per_branch_and_writes_nothing(project: Path):
    proc = run_cli(project, "--local", "--repo-id", REPO_ID, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    variant = only_variant(project).name
    assert "branch v1 (new branch):" in proc.stdout
    assert f"  + build/{variant}/metadata.json" in proc.stdout
    assert "  + benchmarks/results/h100-2026-11-20.json" in proc.stdout
    assert "branch main (new branch):" in proc.stdout and "  + README.md" in proc.stdout
    assert "dry run: nothing was written" in proc.stdout
    assert not (project / ".hub").exists()


def test_builds_from_uncommitted_sources_are_published_with_a_warning(tmp_path: Path):
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(ROOT / "build.toml", proj / "build.toml")
    make_fake_variant(proj / "build", host_cpu_variant(), uid="abc1234_dirty")
    proc = run_cli(proj, "--local", "--repo-id", REPO_ID)
    assert proc.returncode == 0, proc.stderr
    assert f"warning: {host_cpu_variant()} built from uncommitted sources" in proc.stderr


def test_default_target_without_repo_id_and_token_is_the_embedded_repository(project: Path, tmp_path):
    env = {"HF_HOME": str(tmp_path / "empty-hf-home"), "HF_TOKEN": ""}
    proc = run_cli(project, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "embedded repository your-org/flash-attn" in proc.stdout
    assert (project / ".hub" / "your-org" / "flash-attn" / "v1").is_dir()


# -- refusals --------------------------------------------------------------------------------------
def test_refuses_variants_of_mixed_versions(project: Path):
    make_fake_variant(project / "build", "torch-stable-abi211-cu130-x86_64-linux", backend="cuda", version=2)
    with pytest.raises(PipelineError, match=r"has version 2, expected 1"):
        publish.publish_local(project, repo_id=REPO_ID)


def test_refuses_variants_from_different_source_trees(project: Path):
    make_fake_variant(project / "build", "torch-stable-abi211-cu130-x86_64-linux", backend="cuda", uid="fff0000")
    with pytest.raises(PipelineError, match="different source trees"):
        publish.publish_local(project, repo_id=REPO_ID)


def test_refuses_unverified_and_modified_builds(project: Path):
    variant = only_variant(project)
    (variant / "__init__.py").write_text(FAKE_INIT + "\n# edited after the check\n")
    with pytest.raises(PipelineError, match="changed after it was checked") as err:
        publish.publish_local(project, repo_id=REPO_ID)
    assert "__init__.py" in str(err.value)
    meta = json.loads((variant / "metadata.json").read_text())
    del meta["digest"]
    (variant / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(PipelineError, match="was not verified"):
        publish.publish_local(project, repo_id=REPO_ID)
    (variant / "metadata.json").write_text("{not json")
    with pytest.raises(PipelineError, match="metadata.json does not parse"):
        publish.publish_local(project, repo_id=REPO_ID)
    assert not (project / ".hub").exists()


def test_refuses_a_variant_whose_check_report_failed(project: Path):
    variant = only_variant(project)
    variant.with_name(f"{variant.name}.check.json").write_text(json.dumps({"passed": False}))
    with pytest.raises(PipelineError, match="failed its checks"):
        publish.publish_local(project, repo_id=REPO_ID)


def test_refuses_directories_the_loader_would_skip(project: Path):
    make_fake_variant(project / "build", "torch213-cxx11-cuda130-x86_64-linux", backend="cuda")
    with pytest.raises(PipelineError, match="not a kernel-builder variant name"):
        publish.publish_local(project, repo_id=REPO_ID)


# -- the Hub ---------------------------------------------------------------------------------------
def test_publish_to_hub_then_get_kernel_over_http(project: Path, hub: HubServer, tmp_path):
    proc = run_cli(project, "--repo-id", REPO_ID)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote v1: {hub.endpoint}/kernels/{REPO_ID}/tree/v1" in proc.stdout
    assert TOKEN not in proc.stdout + proc.stderr
    assert hub.tokens_seen == {TOKEN}
    variant = only_variant(project).name
    v1 = hub.files(REPO_ID, "v1")
    assert f"build/{variant}/__init__.py" in v1
    assert "README.md" not in v1 and ".gitattributes" in v1  # inherited from main when v1 was created
    card = hub.files(REPO_ID, "main")["README.md"].decode()
    assert "library_name: kernels" in card and f'get_kernel("{REPO_ID}", version=1)' in card
    # The user's path: no token, no trust_remote_code; the fake Hub vouches for the org. Telemetry
    # stays on: with HF_HUB_DISABLE_TELEMETRY=1, kernels 0.17.2 sends a user agent ending in "; ",
    # which httpx rejects as an illegal header value before any request leaves the process.
    out = load_in_fresh_process({"HF_TOKEN": "", "KERNELS_CACHE": str(tmp_path / "kcache"),
                                 "HF_HUB_DISABLE_TELEMETRY": "0"})
    assert "LOADED" in out and str(tmp_path / "kcache") in out
    assert "GET /api/organizations/test-org/overview" in hub.requests


def test_hub_republish_is_a_no_op(project: Path, hub: HubServer, capsys):
    publish.publish_hub(project, REPO_ID)
    heads = dict(hub.repo(REPO_ID).branches)
    result = publish.publish_hub(project, REPO_ID)
    assert result.status == "no_changes"
    assert hub.repo(REPO_ID).branches == heads


def test_failed_hub_commit_leaves_the_repository_unchanged(project: Path, hub: HubServer):
    hub.fail_commits_on = {"v1"}
    with pytest.raises(PipelineError, match="injected failure"):
        publish.publish_hub(project, REPO_ID)
    repo = hub.repo(REPO_ID)
    assert set(repo.branches) == {"main"}  # the branch this publish created is gone again
    assert set(hub.files(REPO_ID, "main")) == {".gitattributes"}  # and the card was not written
    hub.fail_commits_on = set()
    assert publish.publish_hub(project, REPO_ID).status == "published"


def test_a_failed_card_commit_is_finished_by_the_next_publish(project: Path, hub: HubServer):
    hub.fail_commits_on = {"main"}
    with pytest.raises(PipelineError, match="injected failure"):
        publish.publish_hub(project, REPO_ID)
    assert "v1" in hub.repo(REPO_ID).branches and "README.md" not in hub.files(REPO_ID, "main")
    hub.fail_commits_on = set()
    result = publish.publish_hub(project, REPO_ID)
    assert [(c.branch, c.empty) for c in result.branches] == [("v1", True), ("main", False)]
    assert "README.md" in hub.files(REPO_ID, "main")


def test_new_hub_branch_drops_build_files_inherited_from_main(project: Path, hub: HubServer):
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo(REPO_ID, repo_type="kernel")
    api.create_commit(REPO_ID, [CommitOperationAdd("build/torch27-cxx11-cu126-x86_64-linux/__init__.py", b"old")],
                      commit_message="legacy main mirror", repo_type="kernel")
    result = publish.publish_hub(project, REPO_ID)
    assert result.branches[0].deletes == ["build/torch27-cxx11-cu126-x86_64-linux/__init__.py"]
    assert not any(p.startswith("build/torch27") for p in hub.files(REPO_ID, "v1"))
    assert any(p.startswith("build/torch27") for p in hub.files(REPO_ID, "main"))


def test_create_pr_opens_pull_requests_instead_of_committing(project: Path, hub: HubServer):
    publish.publish_hub(project, REPO_ID)
    heads = dict(hub.repo(REPO_ID).branches)
    variant = only_variant(project)
    (variant / "extra.py").write_text("z = 3\n")
    write_digest(variant)
    result = publish.publish_hub(project, REPO_ID, create_pr=True)
    assert result.status == "pull_request"
    assert hub.repo(REPO_ID).branches == heads
    assert result.branches[0].url == f"{hub.endpoint}/kernels/{REPO_ID}/discussions/1"


def test_token_never_appears_in_output_or_logs(project: Path, hub: HubServer, capsys, caplog):
    from flash_attn_kernel.cli import main

    caplog.set_level(logging.DEBUG)
    assert main(["--project", str(project), "publish", "--repo-id", REPO_ID]) == 0
    hub.fail_commits_on = {"main"}
    (project / "benchmarks" / "results" / "later.json").write_text(json.dumps({**BENCH_RUN, "date": "2026-11-21"}))
    assert main(["--project", str(project), "publish", "--repo-id", REPO_ID]) == 1
    captured = capsys.readouterr()
    assert "error:" in captured.err
    assert TOKEN not in captured.out + captured.err + caplog.text
    assert hub.tokens_seen == {TOKEN}


def test_hub_without_token_is_refused_with_a_fix(project: Path, hub: HubServer, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    # Nor a stored `hf auth login` token of whoever runs the tests.
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(PipelineError, match="needs a token") as err:
        publish.publish_hub(project, REPO_ID)
    assert "hf auth login" in str(err.value)


# -- the card --------------------------------------------------------------------------------------
def test_card_has_front_matter_usage_exports_variants_and_benchmarks(project: Path):
    from flash_attn_kernel import card
    from flash_attn_kernel import project as project_stage

    variants = publish.collect_variants(project)
    rows = [(v.name, v.backend, v.archs) for v in variants]
    rows.append(("torch-stable-abi211-cu130-x86_64-linux", "cuda", ("8.0", "9.0")))
    rendered = card.render(project, project_stage.load(project), REPO_ID, rows, variants[0].path)
    text = rendered.markdown
    front = text.split("---\n")[1]
    assert "library_name: kernels" in front and "license: bsd-3-clause" in front
    assert f'get_kernel("{REPO_ID}", version=1)' in text
    assert "- `flash_attn_func(q, k, v," in text
    assert f"| `{variants[0].name}` | cpu |" in text
    assert "| `torch-stable-abi211-cu130-x86_64-linux` | cuda | 8.0 9.0 | torch >= 2.11, CUDA 13.x (x >= 0) |" in text
    assert f"kernels benchmark {REPO_ID} --version 1" in text
    assert "| flash-attn-kernel[sm90] | 1.500 | 612.3 |" in text
    assert "![TFLOP/s per implementation" in text
    plot = ElementTree.fromstring(rendered.plot_svg)
    assert plot.tag == "{http://www.w3.org/2000/svg}svg" and "612.3" in rendered.plot_svg
