"""Adapter files under faults: saves killed at every step, hostile or damaged files, extra keys, wrong dtypes,
a save over the working directory. Every failure is a clear error before the model is touched; nothing is lost."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest
import safetensors.torch as st
import torch

import loranull_kernels as lk
from loranull_kernels import adapter_files as adapters, atomic_dir
from loranull_kernels.nn import LoRALinear

from .tiny_models import output, tiny_model, token_batches

Q = "model.layers.0.self_attn.q_proj"
BATCH = token_batches(1, seed=3)[0]


@pytest.fixture(autouse=True)
def _torch_backend():
    with lk.backend.use("torch"):
        yield


def adapted(shift: float):
    model = tiny_model("llama")
    lk.inject(model, lk.AdapterConfig(r=4, init_seed=0))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(shift)
    return model


def out(model):
    with torch.no_grad():
        return output(model, BATCH)


def loaded(path):
    return out(lk.load_adapter(tiny_model("llama"), path))


def hidden_leftovers(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------------- killed saves
class _Killed(BaseException):
    """Stands for SIGKILL: raised instead of the step it interrupts, and by every later step, so no cleanup runs."""


def _kill_at(monkeypatch, k: int) -> list:
    """Patch every filesystem step of a save; the k-th call (0-based) and all calls after it 'die'."""
    calls = []

    def wrap(owner, name):
        real = getattr(owner, name)

        def step(*args, **kwargs):
            calls.append(name)
            if len(calls) > k:
                raise _Killed(name)
            return real(*args, **kwargs)
        monkeypatch.setattr(owner, name, step)

    for owner, name in ((atomic_dir.tempfile, "mkdtemp"), (st, "save_file"), (adapters.json, "dump"), (os, "fsync"),
                        (os, "rename"), (atomic_dir.shutil, "rmtree")):
        wrap(owner, name)
    return calls


def test_save_killed_at_every_step_keeps_an_adapter_and_leaves_nothing_behind(tmp_path, monkeypatch):
    """Kill a save over a previous adapter at each of its steps: the path then loads the previous or the new
    adapter (a save killed between its two renames used to leave none: the previous one sat in a hidden
    ``.old-*`` folder), and the next save removes every leftover."""
    first, second = adapted(0.05), adapted(-0.07)
    expect_first, expect_second = out(first), out(second)
    path = tmp_path / "ad"
    lk.save_adapter(first, path)
    k = 0
    while True:
        with monkeypatch.context() as m:
            calls = _kill_at(m, k)
            try:
                lk.save_adapter(second, path)
                finished = True
            except _Killed:
                finished = False
        got = loaded(path)  # a load repairs a killed save first
        assert torch.equal(got, expect_first) or torch.equal(got, expect_second), f"killed at step {k}: {calls}"
        if finished:
            assert torch.equal(got, expect_second)
            break
        lk.save_adapter(first, path)  # back to the first adapter; this save also cleans up
        assert hidden_leftovers(tmp_path) == [], f"killed at step {k} ({calls[-1]}): leftovers"
        assert torch.equal(loaded(path), expect_first)
        k += 1
    assert k >= 8, f"only {k} steps were interrupted: the step list no longer covers the save"
    assert hidden_leftovers(tmp_path) == []


def test_save_killed_between_renames_in_a_real_process_is_recovered(tmp_path):
    """The report's reproduction: ``os.rename`` turned into ``os._exit`` after its first call."""
    first = adapted(0.05)
    lk.save_adapter(first, tmp_path / "ad")
    expected = out(first)
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.getcwd()!r})
        import torch, loranull_kernels as lk
        from tests.tiny_models import tiny_model
        model = tiny_model("llama")
        lk.inject(model, lk.AdapterConfig(r=4))
        real = os.rename
        def rename(*a):
            real(*a)
            os._exit(3)
        os.rename = rename
        lk.save_adapter(model, {str(tmp_path / "ad")!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert not (tmp_path / "ad").exists() and hidden_leftovers(tmp_path), "the kill did not land between the renames"
    assert torch.equal(loaded(tmp_path / "ad"), expected)
    lk.save_adapter(first, tmp_path / "ad")
    assert hidden_leftovers(tmp_path) == []


def test_stale_temporary_directories_are_removed_by_the_next_save(tmp_path):
    model = adapted(0.01)
    for i in range(3):
        (tmp_path / f".ad.tmp-abcd{i:04d}").mkdir()
        (tmp_path / f".ad.old-efgh{i:04d}").mkdir()
    (tmp_path / ".ad.tmp-notmine").mkdir()  # not a mkdtemp name: someone else's
    lk.save_adapter(model, tmp_path / "ad")
    assert hidden_leftovers(tmp_path) == [".ad.tmp-notmine"]


def test_save_refuses_the_working_directory_and_its_parents(tmp_path, monkeypatch):
    """``save_adapter(model, ".")`` renamed the working directory away and deleted it."""
    model = adapted(0.01)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for target in (".", "", "..", str(work)):
        with pytest.raises(ValueError, match="working directory"):
            lk.save_adapter(model, target)
    assert os.getcwd() == str(work) and work.is_dir()
    lk.save_adapter(model, "sub")  # a subdirectory is fine
    assert (work / "sub" / adapters.WEIGHTS_NAME).is_file()


# ------------------------------------------------------------------------------------------------ hostile files
@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ad"
    lk.save_adapter(adapted(0.02), path)
    return path


def _rewrite_tensors(path, change, digests=True):
    """Change the tensors of a saved adapter; with ``digests``, as a writer would (the JSON's checksums follow)."""
    tensors = st.load_file(str(path / adapters.WEIGHTS_NAME))
    change(tensors)
    st.save_file(tensors, str(path / adapters.WEIGHTS_NAME))
    if digests:
        _rewrite_json(path, lambda m: {**m, "sha256": {k: adapters.tensor_digest(t) for k, t in tensors.items()}})


def _rewrite_json(path, change):
    meta = json.loads((path / adapters.CONFIG_NAME).read_text())
    (path / adapters.CONFIG_NAME).write_text(json.dumps(change(meta)))


def _assert_refused_untouched(path, match):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        lk.load_adapter(model, path)
    assert not any(isinstance(m, LoRALinear) for m in model.modules()), "the model was modified before the error"
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("field", ["weight", "scaling", "lora_merged", "anything"])
def test_extra_tensor_keys_are_refused_before_the_model_is_touched(saved, field):
    """``<layer>.weight`` / ``<layer>.scaling`` raised KeyError after layers were replaced; other keys became
    buffers."""
    _rewrite_tensors(saved, lambda t: t.update({f"{Q}.{field}": torch.zeros(3)}))
    _assert_refused_untouched(saved, f"{Q}.{field}")


def test_tensors_of_unlisted_modules_are_refused(saved):
    _rewrite_tensors(saved, lambda t: t.update({"model.nowhere.lora_A": torch.zeros(4, 64)}))
    _assert_refused_untouched(saved, "model.nowhere.lora_A")


@pytest.mark.parametrize("field,dtype", [("lora_A", torch.int32), ("lora_A", torch.float16),
                                         ("lora_B", torch.float64), ("base_fingerprint", torch.float32)])
def test_tensor_dtypes_other_than_saved_are_refused(saved, field, dtype):
    """An int32 or fp16 lora_A loaded silently (cast, truncated)."""
    _rewrite_tensors(saved, lambda t: t.update({f"{Q}.{field}": (t[f"{Q}.{field}"] * 100).to(dtype)}))
    _assert_refused_untouched(saved, f"{Q}.{field} has dtype")


@pytest.mark.parametrize("field", ["lora_B", "base_fingerprint"])
def test_non_finite_tensors_are_refused(saved, field):
    def poison(t):
        t[f"{Q}.{field}"][0] = float("nan")
    _rewrite_tensors(saved, poison)
    _assert_refused_untouched(saved, f"{Q}.{field} holds NaN")


def test_wrong_shapes_name_the_file_and_key(saved):
    _rewrite_tensors(saved, lambda t: t.update({f"{Q}.lora_A": t[f"{Q}.lora_A"][:, :-1].contiguous()}))
    _assert_refused_untouched(saved, rf"{adapters.WEIGHTS_NAME}: {Q}.lora_A has shape")


@pytest.mark.parametrize("change,match", [
    (lambda m: {k: v for k, v in m.items() if k != "modules"}, "'modules' is missing"),
    (lambda m: {k: v for k, v in m.items() if k != "config"}, "'config' is missing"),
    (lambda m: [m], "JSON is a list"),
    (lambda m: {**m, "modules": [1]}, "'modules' is a list"),
    (lambda m: {**m, "modules": {}}, "'modules' is empty"),
    (lambda m: {**m, "config": {**m["config"], "r": "4"}}, "AdapterConfig.r"),
    (lambda m: {**m, "config": {**m["config"], "exclude_modules": "q_proj"}}, "exclude_modules"),
    (lambda m: {**m, "modules": {Q: {**m["modules"][Q], "in_features": "64"}}}, "in_features"),
    (lambda m: {**m, "modules": {Q: 5}}, r"modules\[.*is a int"),
    (lambda m: {**m, "format_version": True}, "format_version"),
])
def test_malformed_json_is_a_value_error_naming_file_and_key(saved, change, match):
    _rewrite_json(saved, change)
    _assert_refused_untouched(saved, match)
    with pytest.raises(ValueError, match=adapters.CONFIG_NAME):
        lk.load_adapter(tiny_model("llama"), saved)


@pytest.mark.parametrize("damage", ["truncated JSON", "binary JSON", "deeply nested JSON", "truncated tensors",
                                    "empty tensors", "huge header"])
def test_damaged_files_are_value_errors_naming_the_file(saved, damage):
    cfg, weights = saved / adapters.CONFIG_NAME, saved / adapters.WEIGHTS_NAME
    if damage == "truncated JSON":
        cfg.write_text(cfg.read_text()[:40])
    elif damage == "binary JSON":
        cfg.write_bytes(b"\xff\xfe\x00{")
    elif damage == "deeply nested JSON":  # json.load recurses: RecursionError, not a ValueError
        cfg.write_text("[" * 100_000 + "]" * 100_000)
    elif damage == "truncated tensors":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "empty tensors":
        weights.write_bytes(b"")
    else:
        weights.write_bytes((10**15).to_bytes(8, "little") + b"{}")
    name = cfg.name if "JSON" in damage else weights.name
    _assert_refused_untouched(saved, name)


def test_a_merged_model_loads_nothing_and_a_merge_state_is_not_saved(saved, tmp_path):
    model = adapted(0.02)
    assert all(not k.endswith("lora_merged") for k in st.load_file(str(saved / adapters.WEIGHTS_NAME)))
    model.get_submodule(Q).merge()
    with pytest.raises(ValueError, match="merged"):
        lk.load_adapter(model, saved)


def test_rank_above_a_layer_size_is_refused_before_any_layer_is_replaced(tmp_path):
    """A file whose r fits its first layer but not its second: the layer constructor refused it after the first
    layer had been replaced."""
    from torch import nn

    def base():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))

    model = base()
    lk.inject(model, lk.AdapterConfig(r=4, target_modules=["0", "1"]))
    path = tmp_path / "ad"
    lk.save_adapter(model, path)
    _rewrite_json(path, lambda m: {**m, "config": {**m["config"], "r": 8}})

    def widen(t):
        for n, o in (("0", 16), ("1", 4)):
            t[f"{n}.lora_A"], t[f"{n}.lora_B"] = torch.zeros(8, 16), torch.zeros(o, 8)
    _rewrite_tensors(path, widen)
    target = base()
    with pytest.raises(ValueError, match="r=8 exceeds"):
        lk.load_adapter(target, path)
    assert not any(isinstance(m, LoRALinear) for m in target.modules())


# ------------------------------------------------------------------------------------------------- checksums
def _overwrite_bytes(path, key: str, data: bytes, at: int = 0) -> None:
    """Overwrite bytes of one tensor's data in the safetensors file itself (as a disk or a copy might)."""
    import struct

    file = path / adapters.WEIGHTS_NAME
    raw = bytearray(file.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    start = 8 + n + json.loads(raw[8:8 + n])[key]["data_offsets"][0] + at
    raw[start:start + len(data)] = data
    file.write_bytes(bytes(raw))


def test_tensor_bytes_changed_after_saving_are_refused(saved):
    """16 bytes of a tensor overwritten with other finite values loaded without an error (logits moved by 1.7)."""
    import struct

    _overwrite_bytes(saved, f"{Q}.lora_B", struct.pack("<4f", 0.5, -0.25, 1.0, 2.0), at=64)
    _assert_refused_untouched(saved, rf"{adapters.WEIGHTS_NAME}: tensor '{Q}\.lora_B' does not match its SHA-256")


def test_checksums_are_written_for_every_tensor_and_old_files_load(saved, tmp_path):
    meta = json.loads((saved / adapters.CONFIG_NAME).read_text())
    tensors = st.load_file(str(saved / adapters.WEIGHTS_NAME))
    assert set(meta["sha256"]) == set(tensors)
    assert all(meta["sha256"][k] == adapters.tensor_digest(t) for k, t in tensors.items())
    expected = loaded(saved)
    _rewrite_json(saved, lambda m: {k: v for k, v in m.items() if k != "sha256"})  # as written before digests
    assert torch.equal(loaded(saved), expected)


@pytest.mark.parametrize("change,match", [
    (lambda m: {**m, "sha256": {**m["sha256"], f"{Q}.lora_A": "0" * 63}}, "'sha256' must map tensor names"),
    (lambda m: {**m, "sha256": [1]}, "'sha256' must map tensor names"),
    (lambda m: {**m, "sha256": {k: v for k, v in m["sha256"].items() if k != f"{Q}.lora_A"}},
     rf"tensor '{Q}\.lora_A' has no checksum"),
    (lambda m: {**m, "sha256": {**m["sha256"], f"{Q}.rank_scale": "0" * 64}}, rf"'{Q}\.rank_scale' is missing"),
    (lambda m: {**m, "format_version": 0}, "format_version 0 is not a version"),
    (lambda m: {**m, "format_version": -3}, "format_version -3 is not a version"),
])
def test_checksum_and_version_entries_are_checked(saved, change, match):
    _rewrite_json(saved, change)
    _assert_refused_untouched(saved, match)


def test_a_load_interrupted_half_way_leaves_the_original_model(saved, monkeypatch):
    real, calls = adapters._assign, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(adapters, "_assign", interrupted)
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyboardInterrupt):
        lk.load_adapter(model, saved)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())
