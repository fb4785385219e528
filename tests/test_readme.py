"""The README's examples stay true: its Python blocks run, and the demo output it shows is what
the demo prints."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow

README = (ROOT / "README.md").read_text()


@pytest.fixture
def workdir(tmp_path):
    shutil.copytree(ROOT / "data", tmp_path / "data")
    return tmp_path


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_the_two_quick_start_commands():
    quick = README.split("## Quick start", 1)[1].split("##", 1)[0]
    assert re.findall(r"^make (\w+)", quick, flags=re.M) == ["demo", "test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("block", range(len(python_blocks())))
def test_python_examples_run(workdir, block):
    code = python_blocks()[block]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_demo_output_shown_in_readme(workdir):
    shown = re.search(r"```\n(Query data/pizza/image_0001\.jpg.*?)```", README, flags=re.S)
    expected = shown.group(1).splitlines()
    env = dict(os.environ, IMGINDEX_INDEX=str(workdir / "idx"))
    imgindex = [sys.executable, "-m", "imgindex"]
    subprocess.run(
        [*imgindex, "build", "data"], cwd=workdir, env=env, check=True, capture_output=True
    )
    out = subprocess.run(
        [*imgindex, "query", "data/pizza/image_0001.jpg", "-k", "5"],
        cwd=workdir,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert out[:2] == expected[:2]
    for got, want in zip(out[2:], expected[2:], strict=True):
        g, w = got.split(), want.split()
        assert (g[0], g[2], g[3]) == (w[0], w[2], w[3])
        assert float(g[1]) == pytest.approx(float(w[1]), abs=2e-3)
