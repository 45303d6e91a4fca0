"""The README's Python examples run as written, one test per block (so they run in parallel)."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert BLOCKS, "README has no python example"


@pytest.mark.parametrize(
    "block", BLOCKS, ids=[f"block{i}-{b.splitlines()[0][:30]}" for i, b in enumerate(BLOCKS)]
)
def test_readme_python_block_runs(block):
    exec(compile(block, "README.md", "exec"), {})
