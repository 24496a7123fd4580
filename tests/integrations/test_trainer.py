"""HF Trainer and TRL's SFTTrainer train injected adapters with lk.integrations.transformers.AdapterCallback (and a
PEFT model patched with lk.integrations.peft.patch) on a tiny Llama built from a config: the loss goes down, frozen
weights stay bit-identical, RoseLoRA reaches its density, checkpoints hold only the adapter and resume to the
parameters of an uninterrupted run, and 4 accumulated micro-batches make the update of one batch."""
import json
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

import loranull_kernels as lk  # noqa: E402
from loranull_kernels._denormals import flush_denormals  # noqa: E402
from loranull_kernels.integrations.transformers import AdapterCallback, attach, rose_density  # noqa: E402
from tests.helpers import assert_close  # noqa: E402
from tests.pieces_helpers import one_thread  # noqa: E402, F401
from tests.tiny_models import VOCAB, tiny_model, token_batches  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

TARGETS = ["q_proj", "v_proj", "down_proj"]
ROSE = dict(rose_t_init=1, rose_t_final=4, rose_keep=0.25)
METHODS = {
    "lora_null_v2": dict(method="lora_null", freeze_A=True),
    "kasa": dict(method="kasa"),
    "roselora": dict(method="roselora", **ROSE),
    "lalora": dict(method="lalora", lalora_lambda=1.0),
}


@pytest.fixture(autouse=True)
def _torch_backend_flushed():
    with lk.backend.use("torch"), flush_denormals():
        yield


def dataset(n=4, seed=3):
    ids = token_batches(1, batch=n, seq=12, seed=seed)[0]["input_ids"]
    return [{"input_ids": x, "labels": x} for x in ids]


def adapted(overrides, seed=0):
    cfg = lk.AdapterConfig(r=4, alpha=8, target_modules=TARGETS, init_seed=seed, **overrides)
    calib = token_batches(2, seed=1) if cfg.needs_calibration else None
    model = lk.inject(tiny_model("llama"), cfg, calibration_data=calib, progress=False)
    if cfg.effective_regularizer == "lalora":
        lk.estimate_curvature(model, [{**b, "labels": b["input_ids"]} for b in token_batches(2, seed=7)])
    return model


def args(out, **kw):
    base = dict(max_steps=8, per_device_train_batch_size=4, learning_rate=2e-2, lr_scheduler_type="constant",
                logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                dataloader_num_workers=0, weight_decay=0.0)
    base.update(kw)
    return transformers.TrainingArguments(str(out), **base)


def frozen(model):
    """Every frozen parameter and every buffer but the sparsity schedule's state."""
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().clone() for n, t in model.state_dict().items()
            if n not in trained and ".rose_" not in n and ".mask_" not in n}


def assert_frozen_unchanged(model, before):
    after = frozen(model)
    assert after.keys() == before.keys()
    for n, t in before.items():
        assert torch.equal(after[n], t), f"{n} changed"


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", list(METHODS))
def test_trainer_trains_each_method(tmp_path, name):
    model = adapted(METHODS[name])
    before = frozen(model)
    trainer = transformers.Trainer(model=model, args=args(tmp_path), train_dataset=dataset())
    callback = attach(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    seen = losses(trainer)
    assert len(seen) == 8 and seen[-1] < 0.9 * seen[0], seen
    assert_frozen_unchanged(model, before)
    last = trainer.state.log_history[-2]
    cfg = lk.AdapterConfig(**METHODS[name])
    if cfg.effective_regularizer is not None:
        assert last[f"penalty/{cfg.effective_regularizer}"] > 0
    if cfg.effective_sparsity is not None:
        assert rose_density(model) == pytest.approx(0.25) and last["roselora/density"] == pytest.approx(0.25)
        assert last["roselora/keep_fraction"] == 0.25
    else:
        assert "roselora/density" not in last


def test_resume_restores_the_adapter_exactly(tmp_path, caplog):
    cfg = dict(method="kasa", sparsity="roselora", **ROSE)  # penalty, rank_scale, masks, importance EMA, step
    data = dataset(8)
    kw = dict(max_steps=6, save_strategy="steps", save_steps=3)
    straight = adapted(cfg)
    transformers.Trainer(model=straight, args=args(tmp_path / "a", **kw), train_dataset=data,
                         callbacks=[AdapterCallback()]).train()
    ckpt = tmp_path / "a" / "checkpoint-3"
    files = set(os.listdir(ckpt))
    assert {"loranull_adapter.safetensors", "loranull_adapter.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}, "only the adapter is saved"
    assert os.path.getsize(ckpt / "loranull_adapter.safetensors") < 0.5 * sum(
        p.numel() * 4 for p in straight.parameters())

    resumed = adapted(cfg, seed=5)  # another init: everything must come from the checkpoint
    transformers.Trainer(model=resumed, args=args(tmp_path / "a", **kw), train_dataset=data,
                         callbacks=[AdapterCallback()]).train(resume_from_checkpoint=str(ckpt))
    assert not [r for r in caplog.records if "missing keys" in r.getMessage()], "the adapter-only index is expected"
    want, got = dict(straight.named_parameters()), dict(resumed.named_parameters())
    assert want.keys() == got.keys()
    for n in want:
        assert_close(got[n], want[n].detach(), torch.float32, n, tol=1e-6)
    want_b, got_b = dict(straight.named_buffers()), dict(resumed.named_buffers())
    rose = [n for n in want_b if ".rose_" in n or ".mask_" in n]
    assert len(rose) == 5 * 2 * len(TARGETS) and set(rose) <= got_b.keys()
    for n in rose:
        assert_close(got_b[n].float(), want_b[n].float(), torch.float32, n, tol=1e-6)
    assert rose_density(resumed) == pytest.approx(0.25)


def test_gradient_accumulation_1_vs_4_same_update(tmp_path):
    cfg = dict(method="kasa", sparsity="roselora", rose_t_init=0, rose_t_final=1, rose_keep=0.5)
    data = dataset(8)
    results = []
    for bs, accumulation in ((8, 1), (2, 4)):
        model = adapted(cfg)
        transformers.Trainer(model=model, args=args(tmp_path / str(bs), max_steps=1, optim="sgd", learning_rate=0.5,
                                                    per_device_train_batch_size=bs,
                                                    gradient_accumulation_steps=accumulation),
                             train_dataset=data, callbacks=[AdapterCallback()]).train()
        results.append(model)
    start = trainable(adapted(cfg))
    one, four = (dict(m.named_parameters()) for m in results)
    assert max((one[n] - start[n]).abs().max().item() for n in start) > 1e-3, "the step moved the adapters"
    for n in start:
        assert_close(four[n], one[n].detach(), torch.float32, n, tol=1e-5)
    b1, b4 = (dict(m.named_buffers()) for m in results)
    for n in b1:
        if ".rose_imp" in n:
            assert_close(b4[n], b1[n], torch.float32, n, tol=1e-5)


# ------------------------------------------------------------------------------------------------- TRL, PEFT
def tiny_tokenizer():
    """A word-level tokenizer over VOCAB tokens, built in memory (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(VOCAB - 3)]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>"), words


def text_dataset(words, n=4):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    return Dataset.from_dict({"text": [" ".join(words[j] for j in torch.randint(0, 20, (10,), generator=g))
                                       for _ in range(n)]})


def peft_model():
    from peft import LoraConfig, get_peft_model

    from loranull_kernels.integrations import peft as lkpeft

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    return lkpeft.patch(model)


@pytest.mark.parametrize("kind", ["loranull", "peft"])
def test_sft_trainer(tmp_path, kind, fused_calls):
    trl = pytest.importorskip("trl")
    tokenizer, words = tiny_tokenizer()
    model = adapted(dict(method="kasa", sparsity="roselora", **ROSE)) if kind == "loranull" else peft_model()
    before = frozen(model)
    config = trl.SFTConfig(str(tmp_path), max_steps=8, per_device_train_batch_size=4, learning_rate=2e-2,
                           lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
                           use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0, max_length=16,
                           bf16=False)  # CPU: bf16 autocast would be slow, and is not what this test is about
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=text_dataset(words),
                             processing_class=tokenizer, callbacks=[AdapterCallback()])
    trainer.train()
    seen = losses(trainer)
    assert len(seen) == 8 and seen[-1] < 0.9 * seen[0], seen
    assert_frozen_unchanged(model, before)
    if kind == "loranull":
        assert rose_density(model) == pytest.approx(0.25)
        assert trainer.state.log_history[-2]["penalty/kasa"] > 0
    else:
        assert len(fused_calls) >= 8 * 2 * len(TARGETS), "the patched PEFT layers ran the fused op"


def test_trainer_resumes_a_patched_peft_model(tmp_path, fused_calls):
    data = dataset(8)
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2)
    straight = peft_model()
    transformers.Trainer(model=straight, args=args(tmp_path, **kw), train_dataset=data,
                         callbacks=[AdapterCallback()]).train()
    assert "adapter_model.safetensors" in os.listdir(tmp_path / "checkpoint-2")  # PEFT saves its own adapter
    resumed = peft_model()
    transformers.Trainer(model=resumed, args=args(tmp_path, **kw), train_dataset=data,
                         callbacks=[AdapterCallback()]).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    want, got = trainable(straight), trainable(resumed)
    assert want.keys() == got.keys() and len(want) == 2 * 2 * len(TARGETS)
    for n in want:
        assert_close(got[n], want[n], torch.float32, n, tol=1e-6)
    assert fused_calls


# --------------------------------------------------------------------------------------- resume and attach checks
def rose_updates(model) -> set[int]:
    return {int(m.rose_updates) for m in model.modules() if isinstance(m, lk.LoRALinear)}


@pytest.mark.parametrize("how", ["attach_after", "two_callbacks"])
def test_the_schedule_runs_once_per_step_whatever_the_callbacks(tmp_path, how):
    """attach(trainer) on a Trainer that already had an AdapterCallback ran RoseLoRA's update twice per step."""
    model = adapted(METHODS["roselora"])
    callbacks = [AdapterCallback()] + ([AdapterCallback()] if how == "two_callbacks" else [])
    trainer = transformers.Trainer(model=model, args=args(tmp_path, max_steps=2), train_dataset=dataset(),
                                   callbacks=callbacks)
    if how == "attach_after":
        callback = attach(trainer)
        assert callback is callbacks[0] and trainer.callback_handler.callbacks[0] is callback
        assert sum(isinstance(c, AdapterCallback) for c in trainer.callback_handler.callbacks) == 1
        with pytest.raises(ValueError, match="already has an AdapterCallback with other settings .*schedule=True"):
            attach(trainer, schedule=False)
    trainer.train()
    assert rose_updates(model) == {2}


def run_saving(out, cfg, seed, data, resume=None, **kw):
    model = adapted(cfg, seed=seed)
    transformers.Trainer(model=model, args=args(out, **kw), train_dataset=data,
                         callbacks=[AdapterCallback()]).train(resume_from_checkpoint=resume)
    return model


@pytest.mark.parametrize("route", ["callback", "attach", "restored_callback"])
def test_resume_restores_the_adapter_of_the_checkpoint_resumed_not_another_runs(tmp_path, route):
    """trainer.train(resume_from_checkpoint=X) while output_dir held another run's checkpoint-N restored that
    other run's adapter (and X's optimiser and RNG state). "restored_callback": the Trainer replaces the callback
    by one built from the checkpoint's saved state."""
    cfg, data = METHODS["kasa"], dataset(8)
    kw = dict(max_steps=6, save_strategy="steps", save_steps=3)
    straight = run_saving(tmp_path / "a", cfg, 0, data, **kw)
    run_saving(tmp_path / "b", cfg, 1, data, learning_rate=5e-2, **kw)  # another run, same step numbers
    resumed = adapted(cfg, seed=2)
    own = resumed._keys_to_ignore_on_save  # replaced while the Trainer's resume loader runs, then given back
    restore = dict(restore_callback_states_from_checkpoint=True) if route == "restored_callback" else {}
    trainer = transformers.Trainer(model=resumed, args=args(tmp_path / "b", **kw, **restore), train_dataset=data,
                                   callbacks=[] if route == "attach" else [AdapterCallback()])
    if route == "attach":
        attach(trainer)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    want, got = trainable(straight), trainable(resumed)
    for n in want:
        assert_close(got[n], want[n], torch.float32, n, tol=1e-6)
    assert resumed._keys_to_ignore_on_save == own


def test_resume_from_a_checkpoint_without_the_callbacks_state_saves_again(tmp_path):
    """A trainer_state.json with no AdapterCallback entry (written before the callback kept state, or by a run without
    it): the Trainer indexes that entry without a default at its next save, which raised KeyError."""
    cfg, data = METHODS["kasa"], dataset(8)
    kw = dict(max_steps=6, save_strategy="steps", save_steps=3)
    straight = run_saving(tmp_path / "a", cfg, 0, data, **kw)
    ckpt = tmp_path / "b" / "checkpoint-3"  # resumed where it lies, as a run resumes its own checkpoint
    shutil.copytree(tmp_path / "a" / "checkpoint-3", ckpt)
    state_file = ckpt / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["stateful_callbacks"]["AdapterCallback"]
    state_file.write_text(json.dumps(state))
    resumed = run_saving(tmp_path / "b", cfg, 2, data, resume=str(ckpt), **kw)
    assert (tmp_path / "b" / "checkpoint-6" / "loranull_adapter.safetensors").exists()
    want, got = trainable(straight), trainable(resumed)
    for n in want:
        assert_close(got[n], want[n], torch.float32, n, tol=1e-6)


def test_resume_from_naming_another_checkpoint_is_refused(tmp_path):
    cfg, data = METHODS["kasa"], dataset(8)
    kw = dict(max_steps=3, save_strategy="steps", save_steps=3)
    run_saving(tmp_path / "a", cfg, 0, data, **kw)
    run_saving(tmp_path / "b", cfg, 1, data, **kw)
    trainer = transformers.Trainer(model=adapted(cfg), args=args(tmp_path / "c", max_steps=6), train_dataset=data,
                                   callbacks=[AdapterCallback(resume_from=tmp_path / "b" / "checkpoint-3")])
    with pytest.raises(ValueError, match=r"checkpoint-3 hold\(s\) another adapter"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))


def test_attach_checks_the_checkpoint_before_the_trainer_loads_its_optimiser(tmp_path):
    """A kasa checkpoint resumed into a lora model failed in torch's optimiser load ("parameter group ...")."""
    data = dataset(8)
    run_saving(tmp_path / "kasa", METHODS["kasa"], 0, data, max_steps=3, save_strategy="steps", save_steps=3)
    ckpt = tmp_path / "kasa" / "checkpoint-3"
    model = adapted(dict(method="lora"))
    before = trainable(model)
    trainer = transformers.Trainer(model=model, args=args(tmp_path / "lora", max_steps=6), train_dataset=data)
    attach(trainer)
    with pytest.raises(ValueError, match=rf"resume_from_checkpoint='{ckpt}': its adapter \(method 'kasa'.*this model "
                                         r"holds \(method 'lora'"):
        trainer.train(resume_from_checkpoint=str(ckpt))
    after = trainable(model)
    assert all(torch.equal(after[n], t) for n, t in before.items())


def test_callback_flags_must_be_bools():
    """schedule="no" was truthy: the schedule ran."""
    for kw in (dict(schedule="no"), dict(log=0), dict(adapter_only_checkpoints="false"), dict(resume_from=3)):
        with pytest.raises(TypeError, match=f"AdapterCallback: {next(iter(kw))} must be"):
            AdapterCallback(**kw)


def test_callback_refuses_penalties_on_zero3_partitioned_adapters():
    """ZeRO-3 steps flat partitions the penalty hooks never see: KaSA's penalty would be skipped silently, so the
    callback refuses it once the engine partitioned the adapters (marked ``ds_id``); plain LoRA goes on."""
    from types import SimpleNamespace

    state = SimpleNamespace(global_step=0)
    for method, refused in (("kasa", True), ("lora", False)):
        model = lk.inject(tiny_model("llama"), lk.AdapterConfig(method=method, r=4, target_modules=["q_proj"]))
        for m in model.modules():
            if isinstance(m, lk.LoRALinear):
                m.lora_A.ds_id = 1
        if refused:
            with pytest.raises(RuntimeError, match="'kasa'.*DeepSpeed ZeRO-3 partitions them"):
                AdapterCallback().on_train_begin(None, state, None, model=model)
        else:
            AdapterCallback().on_train_begin(None, state, None, model=model)
