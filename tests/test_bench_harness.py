"""The shared benchmark harness: environment columns, timing summaries, result paths, plots."""
import csv
import re

import torch

from loranull_kernels.bench import harness


def test_environment_names_device_versions_date_and_commit():
    env = harness.environment("cpu")
    assert env["device"] and env["torch"] == torch.__version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", env["date"])
    assert env["commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{4,}", env["commit"])


def test_time_fn_and_interleaved_report_ordered_quantiles():
    calls = {"a": 0, "b": 0}

    def make(name, n):
        def fn():
            calls[name] += 1
            return sum(range(n))
        return fn

    t = harness.time_fn(make("a", 1000), warmup=1, rep=2, device="cpu")
    assert 0 < t["p20_ms"] <= t["median_ms"] <= t["p80_ms"]
    calls["a"] = 0
    res = harness.time_interleaved({"a": make("a", 1000), "b": make("b", 200000)}, rounds=5, warmup=2, device="cpu")
    assert calls == {"a": 7, "b": 7}
    assert res["a"]["median_ms"] < res["b"]["median_ms"]
    assert all(r["min_ms"] <= r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] <= r["max_ms"] for r in res.values())
    assert all(len(r["samples_ms"]) == 5 for r in res.values())


def test_write_csv_adds_environment_to_every_row(tmp_path):
    path = harness.write_csv([{"provider": "x", "median_ms": 1.5}, {"provider": "y", "extra": 3}],
                             tmp_path / "deep" / "out.csv", device="cpu")
    rows = list(csv.DictReader(path.open()))
    assert [r["provider"] for r in rows] == ["x", "y"] and rows[1]["extra"] == "3" and rows[0]["extra"] == ""
    assert all(r["device"] == harness.device_name("cpu") and r["commit"] and r["date"] for r in rows)


def test_results_go_outside_the_source_tree_unless_a_directory_is_given(tmp_path, monkeypatch):
    monkeypatch.delenv("LORANULL_RESULTS", raising=False)
    monkeypatch.setenv("LORANULL_CACHE", str(tmp_path / "cache"))
    p = harness.results_path("calibration", "csv", device="cpu")
    assert p.parent == tmp_path / "cache" / "results"  # never the checkout's committed benchmarks/results/
    assert p.name == f"calibration_{harness.device_slug('cpu')}.csv"
    assert re.fullmatch(r"[a-z0-9-]+", harness.device_slug("cpu"))
    monkeypatch.setenv("LORANULL_RESULTS", str(tmp_path / "mine"))
    assert harness.results_path("x", "png", device="cpu").parent == tmp_path / "mine"
    assert harness.results_path("x", "png", device="cpu", out_dir=tmp_path / "o").parent == tmp_path / "o"


def test_ratio_spread_pairs_the_rounds():
    a = {"samples_ms": [2.0, 4.0, 3.0]}
    b = {"samples_ms": [1.0, 1.0, 2.0]}
    assert harness.ratio_spread(a, b) == {"median": 2.0, "min": 1.5, "max": 4.0}


def test_plot_writes_a_png(tmp_path):
    rows = [{"x": k, "ms": k * f, "who": w} for k in (1, 2, 4) for w, f in (("a", 1.0), ("b", 2.0))]
    out = tmp_path / "p.png"
    harness.plot(rows, x="x", y="ms", group="who", path=out, logy=True)
    harness.plot(rows, x="x", y="ms", group="who", path=tmp_path / "bar.png", kind="bar")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "bar.png").stat().st_size > 1000


def test_environment_records_the_commit_of_the_checkout_it_runs_from():
    # git is asked from the package's own folder, not from the caller's working directory or a fixed parent.
    import subprocess
    from pathlib import Path

    root = Path(harness.__file__).resolve().parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode != 0:
        assert harness.environment("cpu")["commit"] == "unknown"
    else:
        assert harness.environment("cpu")["commit"] == head.stdout.strip()


def test_markdown_table_has_a_header_a_rule_and_one_line_per_row():
    table = harness.markdown_table(["a", "b"], [[1, "x"], ["", 2.5]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x |", "|  | 2.5 |"]
