"""The installable package: ``python -m build`` makes an sdist and a wheel that hold the shipped
SAEs, suites, rubrics, templates and demo completions; the wheel, installed into a fresh venv
outside the repository (its dependencies from this interpreter), runs ``latentaudit demo
--dry-run`` and a tiny attribution."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import latentaudit

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).parents[1]
SHIPPED = ("pipeline/demo/completions.jsonl", "pipeline/demo/demo.toml",
           "suites/false-belief.jsonl", "rubrics/false-belief.json",
           "report/templates/report.html", "saes/shipped/qwen2.5-0.5b-instruct/sae.safetensors",
           "saes/shipped/qwen2.5-0.5b-instruct/cfg.json",
           "saes/shipped/qwen2.5-0.5b-instruct/CARD.md")

pytestmark = pytest.mark.slow  # builds an 80 MB wheel and a virtual environment


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    """A command with this test run's PYTHONPATH removed (the venv must import its own copy)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900,
                          env=env, **kw)


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    done = run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> Path:
    """A fresh venv (with this interpreter's packages) and the wheel installed without deps."""
    folder = tmp_path_factory.mktemp("venv") / "env"
    assert not folder.is_relative_to(ROOT)
    assert run(sys.executable, "-m", "venv", "--system-site-packages", folder).returncode == 0
    wheel, = dist.glob("*.whl")
    done = run(folder / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index",
               "--force-reinstall", wheel)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def test_one_version_names_the_package_and_its_files(dist):
    names = sorted(p.name for p in dist.iterdir())
    v = latentaudit.__version__
    assert names == [f"latentaudit-{v}-py3-none-any.whl", f"latentaudit-{v}.tar.gz"]
    assert f"## {v}" in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "latentaudit.__version__"}


def test_the_wheel_and_sdist_hold_the_package_data(dist):
    wheel = zipfile.ZipFile(next(dist.glob("*.whl"))).namelist()
    sdist = tarfile.open(next(dist.glob("*.tar.gz"))).getnames()
    top = f"latentaudit-{latentaudit.__version__}"
    for rel in SHIPPED:
        assert f"latentaudit/{rel}" in wheel, rel
        assert f"{top}/src/latentaudit/{rel}" in sdist, rel
    assert f"{top}/CHANGELOG.md" in sdist
    entry = zipfile.ZipFile(next(dist.glob("*.whl"))).read(
        f"{top}.dist-info/entry_points.txt").decode()
    assert "latentaudit = latentaudit.cli:main" in entry


def test_the_installed_wheel_runs_outside_the_repository(venv, tmp_path):
    from tiny import random_sae, save_tiny

    py, cli = venv / "bin" / "python", venv / "bin" / "latentaudit"
    where = run(py, "-c", "import latentaudit; print(latentaudit.__file__)", cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout + where.stderr
    dry = run(cli, "demo", "--dry-run", "--out", tmp_path / "demo", cwd=tmp_path)
    has_model = run(py, "-c", "from latentaudit.models import embedded as e; n = "
                    "'qwen2.5-0.5b-instruct'; print(e.is_cached(n) or e.is_installed(n))",
                    cwd=tmp_path).stdout.strip()  # as the installed package sees it
    if has_model == "True":
        assert dry.returncode == 0, dry.stderr[-3000:]
        assert re.search(r"^attribute\s+run", dry.stdout, re.M), dry.stdout
    else:  # the shipped config and SAE are found; only the embedded model is missing
        assert dry.returncode == 2 and "is not installed" in dry.stderr, dry.stderr[-3000:]
    model = save_tiny(tmp_path / "model")
    random_sae(32, 16, layer=1).save(tmp_path / "sae")
    data = ROOT / "examples" / "false-belief-small.jsonl"
    (tmp_path / "data.jsonl").write_text(
        "".join(data.read_text().splitlines(keepends=True)[:8]))
    done = run(cli, "attribute", "--model", model, "--sae", tmp_path / "sae", "--data",
               tmp_path / "data.jsonl", "--out", tmp_path / "run", "--top-k", "5",
               "--device", "cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = (tmp_path / "run" / "ranking.jsonl").read_text().splitlines()
    assert len(rows) == 5 and json.loads(rows[0])["rank"] == 1
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["versions"]["latentaudit"] == latentaudit.__version__
