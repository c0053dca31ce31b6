"""The README's Python snippets run as pasted (a newcomer's first hour starts there)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_snippets_run_as_pasted(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README shows at least one Python snippet"
    for i, code in enumerate(blocks):
        script = tmp_path / f"snippet_{i}.py"
        script.write_text("import torch; torch.set_num_threads(1)\n" + code)
        r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"README snippet {i} failed:\n{code}\n{r.stderr[-2000:]}"
        assert r.stdout.strip(), f"README snippet {i} printed nothing"
