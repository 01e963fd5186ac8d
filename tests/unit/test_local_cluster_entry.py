"""`vagrant/local-cluster` run directly by a Python without the project's libraries and no
virtualenv beside it: one line saying how to make one. (That it runs itself under an existing
virtualenv is shown by tests/functional/test_toolbox.py, which brings a cluster up that way.)"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "vagrant" / "local-cluster"
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")

pytestmark = pytest.mark.skipif(SYSTEM_PYTHON is None, reason="no system python3")


def bare_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "PYTHON"))}
    env["PATH"] = "/usr/bin:/bin"
    env.pop("VIRTUAL_ENV", None)
    return env


def test_without_a_virtualenv_it_says_to_run_setup(tmp_path: Path) -> None:
    copy = tmp_path / "vagrant" / "local-cluster"
    copy.parent.mkdir()
    shutil.copy(SCRIPT, copy)
    probe = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import pyetcd"], capture_output=True, env=bare_env()
    )
    if probe.returncode == 0:
        pytest.skip("the system python has the etcd client: no re-exec needed there")
    proc = subprocess.run(
        [str(SYSTEM_PYTHON), str(copy), "status"],
        capture_output=True, text=True, env=bare_env(), timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr == (
        f"local-cluster: the project's virtualenv {tmp_path / '.venv'} is not set up: "
        "run scripts/setup first\n"
    )
