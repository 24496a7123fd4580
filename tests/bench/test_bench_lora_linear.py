"""The lora_linear benchmark runs end to end: providers checked against the reference, CSV with metadata, plot."""
import csv

import pytest
import torch

from loranull_kernels.bench import lora_linear as bench


@pytest.mark.slow
def test_benchmark_writes_csv_and_plot(tmp_path, capsys):
    rows = bench.main(["--M", "96", "--K", "48", "--N", "40", "--r", "4", "--dropout", "0", "0.1", "--rounds", "2",
                       "--out-dir", str(tmp_path), "--device", "cpu"])
    providers = {r["provider"] for r in rows}
    assert {"frozen", "naive", "peft", "lk-torch"} <= providers and "lk-triton" not in providers
    assert {r["mode"] for r in rows} == {"forward", "backward", "full"}
    frozen = [r for r in rows if r["provider"] == "frozen"]
    assert all(r["ratio_to_frozen"] == 1.0 for r in frozen)
    assert all(r["median_ms"] > 0 for r in rows)
    (csv_file,) = tmp_path.glob("lora_linear_*.csv")
    (png_file,) = tmp_path.glob("lora_linear_*.png")
    assert png_file.stat().st_size > 1000
    with csv_file.open() as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows)
    for key in ("device", "torch", "date", "commit"):
        assert written[0].get(key), f"CSV rows must carry {key}"
    assert "fwd+bwd time / frozen" in capsys.readouterr().out


def test_provider_check_catches_a_wrong_provider():
    case = bench.Case(32, 24, 20, 4, 0.0, torch.float32)
    providers, inputs = bench.make_providers(case, torch.device("cpu"))
    fn, params = providers["lk-torch"]
    providers["lk-torch"] = (lambda x: fn(x) * 1.01, params)
    with pytest.raises(AssertionError, match="lk-torch"):
        bench.check_providers(providers, inputs, case, torch.device("cpu"))


@pytest.mark.slow
def test_nf4_base_rows(tmp_path, capsys):
    """``--base nf4``: the providers over a bitsandbytes NF4 base, PEFT's own Linear4bit LoRA layer among them, each
    checked against the reference on the dequantized weight; ours keeps no dense copy of the base for the backward."""
    pytest.importorskip("bitsandbytes")
    rows = bench.main(["--base", "nf4", "--M", "64", "--K", "128", "--N", "64", "--r", "4", "--dropout", "0",
                       "--rounds", "2", "--out-dir", str(tmp_path), "--device", "cpu"])
    full = {r["provider"]: r for r in rows if r["mode"] == "full"}
    assert {"frozen", "naive", "peft", "lk-torch"} <= set(full) and {r["base"] for r in rows} == {"nf4"}
    dense_mb = 128 * 64 * 4 / 2**20
    assert full["lk-torch"]["saved_mb"] < dense_mb  # packed data and scales, never the float32 weight
    assert full["naive"]["saved_mb"] >= dense_mb  # the naive path keeps the dequantized copy
    (csv_file,) = tmp_path.glob("lora_linear_nf4_*.csv")
    assert "frozen bitsandbytes NF4 Linear4bit" in capsys.readouterr().out


def test_nf4_provider_check_catches_a_wrong_weight():
    pytest.importorskip("bitsandbytes")
    case = bench.Case(32, 128, 64, 4, 0.0, torch.float32, "nf4")
    providers, inputs = bench.make_providers(case, torch.device("cpu"))
    bench.check_providers(providers, inputs, case, torch.device("cpu"))
    weight, *rest = inputs
    with pytest.raises(AssertionError, match="frozen"):
        bench.check_providers(providers, (weight * 1.01, *rest), case, torch.device("cpu"))
