"""The README's first command, as a new user types it: no test tools, no extras, an empty cache."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bash_blocks() -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.M | re.S)


def test_the_first_command_installs_without_extras_and_ci_runs_it_as_written():
    first, tests = bash_blocks()[:2]
    assert first.count("\n") == 1 and first.strip().endswith("&& medpfl attack")
    assert "pip install -e . " in first and "[" not in first  # no extra: what a new user gets
    assert tests.strip().endswith("python -m pytest -q") and "'.[test," in tests
    ci = (ROOT / ".ci" / "run").read_text()
    # CI takes both commands from the README itself, so the two cannot drift apart.
    assert 'first_command=$(readme_block 1)' in ci and 'test_command=$(readme_block 2)' in ci
    assert 'bash -euo pipefail -c "$first_command"' in ci and 'MEDPFL_CACHE="$scratch/cache"' in ci


def test_the_default_path_runs_without_pytest(tmp_path):
    """pytest comes only with the [test] extra: building the embedded set from scratch and attacking must
    not import it (nibabel.testing does)."""
    out = tmp_path / "run"
    code = ("import sys; sys.modules['pytest'] = None; from medpfl.cli import main; "
            "sys.exit(main(['attack', '--n-images', '1', '--steps', '1', '--image-size', '16', '--restarts', '0', "
            f"'--quiet', '--out', {str(out)!r}]))")
    env = {**os.environ, "MEDPFL_CACHE": str(tmp_path / "empty-cache")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["n_images"] == 1
    assert (tmp_path / "empty-cache").is_dir()
