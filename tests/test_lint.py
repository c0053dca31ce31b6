"""The tree stays clean under the project's ruff rules (pyproject.toml [tool.ruff]); `ruff check --fix` fixes most."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is part of the test extras: `pip install -e '.[test]'` (make test installs it)"
    r = subprocess.run([ruff, "check", "rlpt", "tests", "bench", "examples"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
