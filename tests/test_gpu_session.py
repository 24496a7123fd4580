"""benchmarks/gpu_session.sh --dry-run: every step of the one-shot GPU session is checked on the CPU (pip's dry run
of the install, the extension's sources, a real compile report of one kernel, the benchmarks' own parsers on the
exact GPU command lines, collection of the GPU tests), so the script does not fail on the day a GPU comes."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["install", "extension", "compile_report", "bench_reference", "bench_nf4", "gpu_tests", "bench_calibration",
         "bench_nullspace"]


@pytest.mark.slow
def test_dry_run_checks_every_step(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "--dry-run"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    log = (tmp_path / "gpu_session_cpu_dry.log").read_text() if (tmp_path / "gpu_session_cpu_dry.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:] + log[-4000:]
    with open(tmp_path / "gpu_session_cpu_dry.csv") as f:
        rows = {r["step"]: r["status"] for r in csv.DictReader(f)}
    assert rows == {s: "ok" for s in STEPS}, log[-4000:]
    assert "parse-only ok: loranull_kernels.bench.lora_linear" in log  # the benchmark's parser saw the flags
    assert "'base': 'nf4'" in log  # ... the NF4 row's too
    assert "predicted ratio" in proc.stdout  # the short table ends the run
    assert not (tmp_path / ".parse_only.py").exists()


def test_refuses_unknown_arguments(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "--now"], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, OUT=str(tmp_path)))
    assert proc.returncode == 2 and "usage" in proc.stderr
