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
