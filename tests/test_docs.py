"""The README's code blocks and the examples run verbatim, from a folder outside the repository."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(python|sh)\n(.*?)```", README, flags=re.S)
SETUP = "python3 -m venv"  # the two set-up commands: CI runs the test one itself, the other is the main job
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def run(command: list[str], cwd: Path, data_root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PRUNELAB_DATA": str(Path(data_root).resolve()), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_readme_has_blocks_to_run():
    kinds = [kind for kind, body in BLOCKS if SETUP not in body]
    assert kinds.count("python") >= 3 and kinds.count("sh") >= 1


@pytest.mark.parametrize("index", [i for i, (kind, body) in enumerate(BLOCKS) if SETUP not in body])
def test_readme_block_runs(index, tmp_path, data_root):
    kind, body = BLOCKS[index]
    if kind == "python":
        result = run([sys.executable, "-c", body], tmp_path, data_root)
    else:
        result = run(["bash", "-e", "-c", body], tmp_path, data_root)
    assert result.returncode == 0, f"block {index} failed:\n{body}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"


def test_the_main_job_runs_from_any_folder(tmp_path, data_root):
    result = run([str(Path(sys.executable).parent / "prunelab"), "run", "quickstart", "--epochs", "1",
                  "--finetune-epochs", "1", "--out", "q", "--no-latency", "--quiet"], tmp_path, data_root)
    assert result.returncode == 0, result.stderr
    assert "test error" in result.stdout and "0.9000" in result.stdout


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(script, tmp_path, data_root):
    result = run([sys.executable, str(script), "--quick"], tmp_path, data_root)
    assert result.returncode == 0, f"{script.name}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert result.stdout.strip(), f"{script.name} printed nothing"
