"""The README's `bash` and `python` blocks run as they are written, in order, in an empty directory
that holds the Grok-1 tokenizer (blocks fenced `sh` need what a test machine lacks and are not run)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import TOKENIZER

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)


def test_readme_blocks_run_as_written(tmp_path: Path) -> None:
    blocks = BLOCK.findall((ROOT / "README.md").read_text())
    assert len(blocks) >= 3 and {kind for kind, _ in blocks} == {"bash", "python"}
    shutil.copy(TOKENIZER, tmp_path / "tokenizer.model")
    # src/ first: the `groklm` script then runs this checkout's code even where the package is installed from another.
    path = f"{ROOT / 'src'}{os.pathsep}{ROOT}"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": path}
    for kind, code in blocks:
        cmd = ["bash", "-euo", "pipefail", "-c", code] if kind == "bash" else [sys.executable, "-c", code]
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"README block failed:\n{code}\n--- stderr:\n{r.stderr[-3000:]}"
        assert "Traceback" not in r.stderr, r.stderr
