"""The README's Python examples run as written (in order, sharing one namespace)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    pytest.importorskip("transformers")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    ns: dict = {}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"README.md python block {i}", "exec"), ns)
        except Exception as e:  # name the block that broke
            raise AssertionError(f"README python block {i} failed: {type(e).__name__}: {e}\n{code}") from e
