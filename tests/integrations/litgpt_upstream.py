"""Run LitGPT's own LoRA tests with and without ``lk.integrations.litgpt.patch`` and compare the outcomes.

    python -m tests.integrations.litgpt_upstream <litgpt tests dir> [test files, default test_lora.py]

The tests come from LitGPT's source distribution on PyPI (``pip download --no-binary :all: --no-deps litgpt==X``),
which ships ``tests/`` without its ``conftest.py`` and data fixtures: this module, loaded into each pytest run as a
plugin (``-p tests.integrations.litgpt_upstream``), provides the fixtures those tests use. With
``LORANULL_LITGPT_PATCH=1`` every ``LoRALinear`` / ``LoRAQKVLinear`` is patched as it is built, so each test runs
its layers through the fused op wherever their state allows. The script runs pytest twice (unpatched, patched),
prints both summaries and the fused calls of the patched run, and exits non-zero when any test's outcome differs
or when no call reached the fused op.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

_PATCH = os.environ.get("LORANULL_LITGPT_PATCH") == "1"
_OUT = os.environ.get("LORANULL_OUTCOMES")
_outcomes: dict[str, str] = {}
_fused = [0]


def pytest_configure(config):
    if not _PATCH:
        return
    from loranull_kernels.integrations import litgpt as lklit

    real = lklit.lora_linear

    def counted(*a, **k):
        _fused[0] += 1
        return real(*a, **k)

    lklit.lora_linear = counted
    lklit.patch_new_layers()


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":  # a setup error or skip is the test's outcome too
        _outcomes.setdefault(report.nodeid, report.outcome)


def pytest_sessionfinish(session, exitstatus):
    if _OUT:
        Path(_OUT).write_text(json.dumps({"outcomes": _outcomes, "fused_calls": _fused[0]}))


# --- the fixtures of LitGPT's tests/conftest.py that its LoRA tests use (not shipped in its sdist) ---

@pytest.fixture(autouse=True)
def restore_default_dtype():
    torch.set_default_dtype(torch.float32)


@pytest.fixture(autouse=True)
def destroy_process_group():
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture()
def fake_checkpoint_dir(tmp_path):
    os.chdir(tmp_path)
    checkpoint_dir = tmp_path / "checkpoints" / "tmp"
    checkpoint_dir.mkdir(parents=True)
    for name in ("lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json"):
        (checkpoint_dir / name).touch()
    return checkpoint_dir


class _TensorLike:
    def __eq__(self, other):
        return isinstance(other, torch.Tensor)


class _FloatLike:
    def __eq__(self, other):
        return not isinstance(other, int) and isinstance(other, float)


@pytest.fixture()
def tensor_like():
    return _TensorLike()


@pytest.fixture()
def float_like():
    return _FloatLike()


@pytest.fixture()
def alpaca_path(tmp_path):
    """An Alpaca-format file: the finetuning scripts' tests only need a few well-formed records."""
    records = [{"instruction": f"Say the number {i}.", "input": "" if i % 2 else f"n = {i}",
                "output": f"The number is {i}."} for i in range(12)]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records))
    return path


def _run(tests_dir: Path, files: list[str], patched: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "outcomes.json"
        env = {**os.environ, "LORANULL_LITGPT_PATCH": "1" if patched else "0", "LORANULL_OUTCOMES": str(out),
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                              os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.integrations.litgpt_upstream",
               "--color=no", "--rootdir", str(tests_dir), *[str(tests_dir / f) for f in files]]
        proc = subprocess.run(cmd, env=env, cwd=tests_dir, capture_output=True, text=True)
        summary = [line for line in proc.stdout.splitlines() if line.strip()][-1:]
        print(f"{'patched' if patched else 'unpatched'}: {summary[0] if summary else proc.stderr[-2000:]}")
        if not out.exists():
            print(proc.stdout[-4000:], proc.stderr[-4000:])
            raise SystemExit("the pytest run wrote no outcomes")
        return json.loads(out.read_text())


def main(argv: list[str]) -> int:
    tests_dir = Path(argv[0]).resolve()
    files = argv[1:] or ["test_lora.py"]
    plain, patched = _run(tests_dir, files, False), _run(tests_dir, files, True)
    a, b = plain["outcomes"], patched["outcomes"]
    differ = sorted(n for n in a.keys() | b.keys() if a.get(n) != b.get(n))
    counts = {o: sum(v == o for v in b.values()) for o in sorted(set(b.values()))}
    print(f"outcomes with the patch: {counts}; fused calls: {patched['fused_calls']}")
    for n in differ:
        print(f"DIFFERS: {n}: unpatched {a.get(n)}, patched {b.get(n)}")
    if not a:
        print("no test ran")
        return 1
    if patched["fused_calls"] == 0:
        print("no call reached the fused op: the patch is not running inside LitGPT")
        return 1
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
