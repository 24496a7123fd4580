"""Every ```python example in README.md runs, in order, in one namespace (the README stays true). Schematic
fragments that are not meant to run on their own are fenced as ```py instead."""
import re
from pathlib import Path

import pytest

import loranull_kernels as lk

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 8, "README lost its examples"
    monkeypatch.chdir(tmp_path)  # examples that write files write here
    namespace = {}
    with lk.backend.use("torch"):
        for i, code in enumerate(blocks):
            try:
                exec(compile(code, f"README.md[python block {i}]", "exec"), namespace)
            except Exception as exc:  # say which block broke
                raise AssertionError(f"README python block {i} failed: {type(exc).__name__}: {exc}\n{code}") from exc
