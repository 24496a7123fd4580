"""The command lines as a new user meets them: --help in plain text, exit 0 on success, every bad argument refused
in one line with exit status 2 before any long work starts, results written outside the source tree."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loranull_kernels.__main__ as main_job
from loranull_kernels import _cli, demo
from loranull_kernels._denormals import _flushing, flush_denormals
from loranull_kernels.bench import forgetting_report, harness
from loranull_kernels.bench import lora_linear as bench

COMMANDS = {
    "loranull-bench": bench.main,
    "loranull-forgetting": forgetting_report.main,
    "loranull-demo": demo.main,
    "python -m loranull_kernels": main_job.main,
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_is_plain_text_and_exits_0(name, capsys):
    with pytest.raises(SystemExit) as exc:
        COMMANDS[name](["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: {name}")
    for markup in ("``", ":mod:", ":func:", ":class:", ":data:"):
        assert markup not in text, (markup, text)


@pytest.mark.parametrize("name, argv, message", [
    ("loranull-bench", ["--dropout", "1.5", "--M", "8"], "--dropout"),
    ("loranull-bench", ["--device", "tpu"], "--device"),
    ("loranull-bench", ["--rounds", "0"], "--rounds"),
    ("loranull-bench", ["--r", "8"], "--r needs --M"),
    ("loranull-bench", ["--M", "8", "--name", "../x"], "--name"),
    ("loranull-forgetting", ["--quick", "--methods", "nonsense"], "unknown methods"),
    ("loranull-forgetting", ["--quick", "--seeds", "-1"], "--seeds"),
    ("loranull-forgetting", ["--quick", "--workers", "0"], "--workers"),
    ("loranull-forgetting", ["--quick", "--pretrain-steps", "x"], "--pretrain-steps"),
    ("loranull-forgetting", ["--quick", "--pretrain-steps", "2"], "steps must be ≥ 3"),
    ("loranull-forgetting", ["--replot", "/nonexistent/runs.csv"], "--replot"),
    ("loranull-demo", ["--seed", "-3"], "--seed"),
    ("python -m loranull_kernels", ["--bogus"], "--bogus"),
])
def test_bad_arguments_exit_2_with_one_line_before_any_work(name, argv, message, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    for module, attr in ((forgetting_report, "run"), (bench, "run_case"), (demo, "run"), (demo, "run_model")):
        monkeypatch.setattr(module, attr, no_work)
    with pytest.raises(SystemExit) as exc:
        COMMANDS[name](argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith(f"{name}: error:"), err


# Every option that names a path, given a file where a folder goes, a folder under a file, a missing model or a
# file that is not what the option reads: refused in one line before any work (these ran the whole benchmark,
# 41 s for loranull-bench --quick, then raised FileExistsError; --model /nonexistent ended in a hub traceback).
PATH_CASES = [
    ("loranull-bench", ["--quick", "--out-dir", "{file}"], "--out-dir '{file}': not a folder"),
    ("loranull-bench", ["--quick", "--out-dir", "{file}/sub"], "not a folder ({file} is a file)"),
    ("loranull-forgetting", ["--quick", "--out-dir", "{file}"], "--out-dir '{file}': not a folder"),
    ("loranull-forgetting", ["--model", "/nonexistent/model"], "--model '/nonexistent/model': no such file or folder"),
    ("loranull-forgetting", ["--model", "{file}"], "a file, but not a .gguf one"),
    ("loranull-forgetting", ["--model", "no-such-org/no-such-model-xyz"], "the Hugging Face hub (or its local cache)"),
    ("loranull-forgetting", ["--replot", "{file}"], "not a runs CSV of this benchmark (no rows)"),
    ("loranull-forgetting", ["--replot", "{csv}"], "not a runs CSV of this benchmark (no column 'family')"),
    ("loranull-forgetting", ["--replot", "{binary}"], "cannot be read as CSV"),
    ("loranull-forgetting", ["--replot", "{csv}", "--out-dir", "x"], "--out-dir does nothing with --replot"),
    ("python -m loranull_kernels", ["--out-dir", "{file}"], "--out-dir '{file}': not a folder"),
]


@pytest.mark.parametrize("name, argv, message", PATH_CASES)
def test_options_naming_paths_are_checked_before_any_work(name, argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub id case must not wait for a network
    files = {"file": tmp_path / "a_file", "csv": tmp_path / "x_runs_cpu.csv", "binary": tmp_path / "b_runs_cpu.csv"}
    files["file"].write_text("")
    files["csv"].write_text("method,lr\nlora,0.1\n")
    files["binary"].write_bytes(b"\xff\xfe\x00\x81")
    fill = {k: str(v) for k, v in files.items()}

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    for module, attr in ((forgetting_report, "run"), (bench, "run_case"), (demo, "run"), (demo, "run_model"),
                         (main_job.backend, "report")):
        monkeypatch.setattr(module, attr, no_work)
    with pytest.raises(SystemExit) as exc:
        COMMANDS[name]([a.format(**fill) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(**fill) in err and err.startswith(f"{name}: error:"), err


def test_a_default_output_folder_that_cannot_be_used_is_named(capsys, monkeypatch, tmp_path):
    (tmp_path / "results").write_text("")
    monkeypatch.setenv("LORANULL_RESULTS", str(tmp_path / "results"))
    with pytest.raises(SystemExit):
        bench.main(["--quick"])
    assert "the default --out-dir ($LORANULL_RESULTS)" in capsys.readouterr().err
    monkeypatch.setenv("LORANULL_RESULTS", str(tmp_path / "fine"))
    monkeypatch.setenv("LORANULL_CACHE", str(tmp_path / "results" / "cache"))
    with pytest.raises(SystemExit):
        forgetting_report.main(["--quick"])
    assert "the model cache ($LORANULL_CACHE)" in capsys.readouterr().err


def test_forgetting_cli_passes_the_pretraining_budget(monkeypatch):
    seen = {}

    def fake_run(cfg, **kwargs):
        seen["cfg"] = cfg
        raise KeyboardInterrupt  # stop before writing anything

    monkeypatch.setattr(forgetting_report, "run", fake_run)
    with pytest.raises(KeyboardInterrupt):
        forgetting_report.main(["--quick", "--pretrain-steps", "3000", "--seeds", "1", "1", "2", "--methods", "lora"])
    cfg = seen["cfg"]
    assert cfg.pretrain.steps == 3000 and cfg.seeds == (1, 2) and cfg.methods == ("lora",)


def test_main_job_writes_outside_the_source_tree_and_prints_its_time(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LORANULL_RESULTS", str(tmp_path / "results"))
    calls = {}
    monkeypatch.setattr(main_job.bench_lora_linear, "main", lambda argv: calls.setdefault("bench", argv) and [])
    monkeypatch.setattr(main_job.demo, "main", lambda argv: calls.setdefault("demo", argv) or {})
    out = main_job.main(["--no-progress"])
    assert calls["bench"] == ["--quick", "--out-dir", str(tmp_path / "results")]
    assert calls["demo"] == ["--no-progress"]
    text = capsys.readouterr().out
    assert "main job done in" in text and str(tmp_path / "results") in text
    assert out["out_dir"] == str(tmp_path / "results")
    repo = Path(__file__).resolve().parents[1]
    assert repo not in harness.default_out_dir().resolve().parents


def test_console_script_exits_0_after_success(tmp_path):
    """The installed entry point (not main()): a successful run exits 0 and prints no return value to stderr."""
    script = Path(sys.executable).with_name("loranull-bench")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "loranull_kernels.bench.lora_linear"]
    env = {**os.environ, "LORANULL_BACKEND": "torch"}
    done = subprocess.run(cmd + ["--M", "64", "--K", "32", "--N", "24", "--r", "4", "--dropout", "0", "--rounds", "1",
                                 "--out-dir", str(tmp_path), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "{'op'" not in done.stderr and "[{" not in done.stderr
    assert len(list(tmp_path.glob("lora_linear_*.csv"))) == 1


def test_flush_denormals_restores_the_global_flag():
    for before in (False, True):
        torch.set_flush_denormal(before)
        try:
            with flush_denormals():
                assert _flushing()
            assert _flushing() == before
            with flush_denormals(False):
                assert _flushing() == before
        finally:
            torch.set_flush_denormal(False)


def test_plain_unwraps_rest_markup():
    assert _cli.plain("See :mod:`.forgetting` and :func:`~x.run`, ``python -m x``.") == \
        "See forgetting and x.run, python -m x."
