"""Every ```python example of README.md and of each docs/ page runs: one namespace per page, its blocks in order,
as a reader would paste them (the documentation stays true wherever an example lives). Schematic fragments that are
not meant to run on their own are fenced as ```py instead."""
import re
from pathlib import Path

import pytest

import loranull_kernels as lk

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# How many runnable examples the pages hold (22 moved out of the README, its 3 of the quickstart, 2 that set up a
# page's namespace, 1 in methods.md): moving an example between pages must not lose one.
MIN_EXAMPLES = 28


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)


def test_no_example_was_lost():
    counts = {page.relative_to(ROOT).as_posix(): len(python_blocks(page)) for page in PAGES}
    assert counts["README.md"] >= 3, "the README lost its quickstart"
    assert sum(counts.values()) >= MIN_EXAMPLES, f"runnable examples were lost: {counts}"


@pytest.mark.slow
@pytest.mark.parametrize("page", [p.relative_to(ROOT).as_posix() for p in PAGES if python_blocks(p)])
def test_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write here
    namespace = {}
    with lk.backend.use("torch"):
        for i, code in enumerate(python_blocks(ROOT / page)):
            try:
                exec(compile(code, f"{page}[python block {i}]", "exec"), namespace)
            except Exception as exc:  # say which block broke
                raise AssertionError(f"{page} python block {i} failed: {type(exc).__name__}: {exc}\n{code}") from exc
