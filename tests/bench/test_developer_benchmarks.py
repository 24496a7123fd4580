"""The developer benchmarks in benchmarks/ (outside the package): each runs as a script from anywhere, and imports
as ``benchmarks.<name>`` (the repository root is on sys.path under pytest, tests/ being a package)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["bench_calibration", "bench_calibration_model", "bench_calibration_text",
                                  "bench_nullspace", "bench_qlora_model"])
def test_runs_as_a_script_from_another_directory(name, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: {name}"), done.stdout[:300]


def test_nullspace_benchmark_writes_where_it_is_told(tmp_path):
    from benchmarks import bench_nullspace

    rows = bench_nullspace.main(["--sizes", "128:8", "--tokens", "512", "--milora", "128x64:4", "--rounds", "1",
                                 "--out-dir", str(tmp_path)])
    written = list(tmp_path.glob("nullspace_*.csv"))
    assert len(written) == 1
    with open(written[0]) as f:
        assert len(list(csv.DictReader(f))) == len(rows) == 4
    leak = {r["method"]: r for r in rows if r["bench"] == "leak"}
    assert leak["eigh"]["leak"] < leak["eigh"]["random_leak"]  # the null space sees less than a random subspace


@pytest.mark.parametrize("name", ["bench_calibration", "bench_calibration_model", "bench_calibration_text",
                                  "bench_nullspace", "bench_qlora_model"])
def test_an_out_dir_that_is_a_file_is_refused_before_any_work(name, tmp_path, capsys):
    """It was found only when the results were written, after the whole benchmark."""
    import importlib

    module = importlib.import_module(f"benchmarks.{name}")
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit) as exc:
        module.main(["--out-dir", str(tmp_path / "f")])
    assert exc.value.code == 2
    assert f"--out-dir '{tmp_path / 'f'}': not a folder" in capsys.readouterr().err


def test_bench_qlora_model_needs_peft_among_its_providers(capsys):
    """Its ratios are to PEFT QLoRA's run: without it the table failed after every child process had run."""
    from benchmarks import bench_qlora_model

    with pytest.raises(SystemExit) as exc:
        bench_qlora_model.main(["--providers", "ours"])
    assert exc.value.code == 2 and "--providers must include peft" in capsys.readouterr().err
