"""The built package carries what an installed node needs: migrations, the default model, the label map."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                             "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    (path,) = out.glob("dicomnode-*.whl")
    return path


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for revision in (REPO / "migrations" / "versions").glob("*.py"):
        assert f"dicomnode/migrations/versions/{revision.name}" in names
    assert {"dicomnode/migrations/env.py", "dicomnode/migrations/script.py.mako",
            "dicomnode/classification/model/default/model.pt", "dicomnode/classification/model/default/model.onnx",
            "dicomnode/classification/model/default/MODEL_CARD.md",
            "trainer/label_map.yaml", "dicomnode/cli/classify.py", "trainer/cli/evaluate.py"} <= names
    packages = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    on_disk = {str(p.parent.relative_to(REPO)) for p in (REPO / "dicomnode").rglob("__init__.py")}
    assert on_disk <= packages  # every subpackage is listed in pyproject.toml


def test_installed_node_upgrades_its_own_database(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    run = [str(venv / "bin" / "dicomnode")]
    data = tmp_path / "data"
    # Run away from the checkout so that only the installed package can be imported.
    for args in (["db", "upgrade", "--data-dir", str(data)], ["db", "current", "--data-dir", str(data)]):
        result = subprocess.run([*run, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import dicomnode; print(dicomnode.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert str(venv) in where.stdout
