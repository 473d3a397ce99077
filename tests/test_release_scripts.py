"""The release workflow: it lints clean, and the scripts it calls run end to end on this machine.

The end-to-end test does what the workflow's jobs do, against the embedded repository instead of
the Hub: a matrix job builds and checks a real CPU variant of the tiny test kernel with
ci/release-build.sh, its build/ becomes an artifact, and a fresh checkout gathers and publishes it
with ci/release-publish.sh; then `kernels.get_kernel` loads it back and runs its op.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
TINY = ROOT / "tests" / "fixtures" / "tiny_kernel"
ACTIONLINT = shutil.which("actionlint")


def release(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "ci" / "release.py"), *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})})


def host_cpu_variant() -> str:
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"torch{major}{minor}-cxx11-cpu-x86_64-linux"


# -- the workflow file -------------------------------------------------------------------------
@pytest.mark.skipif(ACTIONLINT is None, reason="actionlint not installed (pip install -e '.[test]')")
def test_workflow_lints_clean_and_a_broken_one_does_not(tmp_path: Path):
    proc = subprocess.run([ACTIONLINT, "-no-color", str(WORKFLOW)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = tmp_path / "release.yml"
    broken.write_text(WORKFLOW.read_text().replace("needs.plan.outputs.matrix", "needs.plan.outputs.matrixx"))
    proc = subprocess.run([ACTIONLINT, "-no-color", str(broken)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "matrixx" in proc.stdout


def test_workflow_calls_scripts_that_exist_with_matrix_keys_the_planner_writes():
    text = WORKFLOW.read_text()
    scripts = set(re.findall(r"\b(?:bash|python) (ci/[\w.-]+)", text))
    assert {"ci/release.py", "ci/release-build.sh", "ci/release-publish.sh", "ci/release-gpu-tests.sh",
            "ci/setup.sh"} <= scripts
    for script in scripts:
        assert (ROOT / script).is_file(), script
    sys.path.insert(0, str(ROOT / "ci"))
    try:
        import release as release_module
    finally:
        sys.path.pop(0)
    entry = release_module.variant_groups(["torch213-cxx11-cpu-x86_64-linux"])[0]
    for key in set(re.findall(r"(?<![\w.])matrix\.(\w+)", text)):
        assert key in entry, f"release.yml reads matrix.{key}, which ci/release.py does not write"
    assert "secrets.HF_TOKEN" in text and "vars.GPU_RUNNER" in text


# -- ci/release.py -------------------------------------------------------------------------------
def test_matrix_groups_every_planned_variant_once(tmp_path: Path):
    out = tmp_path / "github_output"
    proc = release("matrix", env={"GITHUB_OUTPUT": str(out)})
    assert proc.returncode == 0, proc.stderr
    matrix = json.loads(out.read_text().split("matrix=", 1)[1])
    planned = subprocess.run([sys.executable, "-m", "flash_attn_kernel", "variants", "--json"], capture_output=True,
                             text=True, cwd=ROOT, check=True)
    names = sorted(row["variant"] for row in json.loads(planned.stdout)["variants"])
    grouped = sorted(v for entry in matrix["include"] for v in entry["variants"].split())
    assert grouped == names
    for entry in matrix["include"]:
        cuda = re.fullmatch(r"cu(\d\d)(\d)", entry["group"])
        if cuda and cuda[1] == "12":
            assert entry["image"].endswith(f":cuda{cuda[1]}.{cuda[2]}")  # a full CUDA 12 toolkit
        assert entry["cpu_tests"] == (entry["group"] == "cpu")


def test_check_tag_accepts_the_build_version_only():
    assert release("check-tag", "v1").returncode == 0
    assert release("check-tag", "v1.4.2").returncode == 0
    wrong = release("check-tag", "v2.0.0")
    assert wrong.returncode != 0 and "general.version is 1" in wrong.stderr
    assert release("check-tag", "release-1").returncode != 0


def test_repo_id_refuses_the_placeholder():
    proc = release("repo-id", env={"HF_REPO_ID": ""})
    assert proc.returncode != 0 and "HF_REPO_ID" in proc.stderr
    assert release("repo-id", env={"HF_REPO_ID": "my-org/flash-attn"}).stdout.strip() == "my-org/flash-attn"


def test_gather_merges_artifacts_and_refuses_conflicting_copies(tmp_path: Path):
    for artifact, variant, content in [("build-cpu", "a", "1"), ("build-cu130", "b", "2"), ("build-again", "a", "1")]:
        d = tmp_path / "artifacts" / artifact / variant
        d.mkdir(parents=True)
        (d / "metadata.json").write_text(content)
    assert release("gather", str(tmp_path / "artifacts"), str(tmp_path / "build")).returncode == 0
    assert sorted(p.name for p in (tmp_path / "build").iterdir()) == ["a", "b"]
    (tmp_path / "artifacts" / "build-again" / "a" / "metadata.json").write_text("different")
    proc = release("gather", str(tmp_path / "artifacts"), str(tmp_path / "build"))
    assert proc.returncode != 0 and "two jobs with different files" in proc.stderr


# -- end to end ----------------------------------------------------------------------------------
def test_release_scripts_build_gather_publish_and_load_end_to_end(tmp_path: Path):
    variant = host_cpu_variant()
    env = {**os.environ, "RUN_CPU_TESTS": "0"}
    # Matrix job: build, check, leave build/ for upload-artifact.
    builder = tmp_path / "matrix-job"
    shutil.copytree(TINY, builder)
    proc = subprocess.run(["bash", str(ROOT / "ci" / "release-build.sh"), variant], capture_output=True, text=True,
                          env={**env, "PROJECT": str(builder)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # upload-artifact (path: build/) then download-artifact (pattern: build-*, path: artifacts).
    shutil.copytree(builder / "build", tmp_path / "artifacts" / "build-cpu")
    # Publish job: a fresh checkout without build/.
    publisher = tmp_path / "publish-job"
    shutil.copytree(TINY, publisher)
    publish_env = {**env, "PROJECT": str(publisher)}
    wrong_tag = subprocess.run(["bash", str(ROOT / "ci" / "release-publish.sh"), "v7", str(tmp_path / "artifacts"),
                                "--local"], capture_output=True, text=True, env=publish_env)
    assert wrong_tag.returncode != 0 and not (publisher / ".hub").exists()
    proc = subprocess.run(["bash", str(ROOT / "ci" / "release-publish.sh"), "v1.0.0", str(tmp_path / "artifacts"),
                           "--local"], capture_output=True, text=True, env=publish_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((publisher / "build" / "publish-result.json").read_text())
    assert result["status"] == "published" and result["variants"] == [variant]
    load_path = result["load_path"]
    code = ("import torch, kernels; k = kernels.get_kernel('your-org/tiny-kernel', version=1, backend='cpu'); "
            "a, b = torch.ones(4), torch.arange(4.0); assert torch.equal(k.scaled_add(a, b, 2.0), a + 2 * b); print('ok')")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                            env={**env, "LOCAL_KERNELS": f"your-org/tiny-kernel={load_path}", "HF_HUB_OFFLINE": "1"})
    assert loaded.returncode == 0 and "ok" in loaded.stdout, loaded.stderr[-3000:]
    # Re-running the publish job (a re-run of the workflow) changes nothing.
    again = subprocess.run(["bash", str(ROOT / "ci" / "release-publish.sh"), "v1", str(tmp_path / "artifacts"),
                            "--local"], capture_output=True, text=True, env=publish_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to publish" in again.stdout
