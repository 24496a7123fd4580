"""PEFT's own initialisations as rows of the forgetting benchmarks: the rivals a user would otherwise pick.

Each peer is built by PEFT itself (``LoraConfig(init_lora_weights=...)``, ``get_peft_model``, and for the data-driven
ones PEFT's own preprocessing: ``preprocess_corda`` / ``preprocess_astra`` with a ``run_model`` callback over the
calibration batches, ``initialize_lora_eva_weights`` with them as EVA's dataloader), never rewritten here. The model
then trains as a PEFT model whose LoRA layers run through :func:`loranull_kernels.integrations.peft.patch`, which
logs (and :func:`fused_summary` reports) every layer that keeps PEFT's own forward.

The data-driven peers get exactly the batches LoRA-Null calibrates on, and every peer the benchmark's rank, target
layers, steps and learning-rate grid. Scalings follow the rule of our own rows (docs/benchmarks.md): ``alpha = 2r``
for inits that start at a zero update from a random A (LoRA), ``alpha = r`` for those that start from singular,
eigen- or QR-vectors (PiSSA, OLoRA, CorDA, ASTRA, EVA, MiCA). A configuration PEFT refuses (a quantized base for an
SVD-based init, say) raises :class:`Refused` with PEFT's reason, which the benchmark writes in the row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PeftPeer:
    """One PEFT initialisation: ``init`` is ``LoraConfig.init_lora_weights``; ``alpha_per_r`` sets
    ``lora_alpha = alpha_per_r · r``; ``corda_method`` is CorDA's mode (``"kpm"`` keeps knowledge, ``"ipm"`` previews
    the instruction); ``data`` says which calibration path it takes (``"corda"``, ``"astra"``, ``"eva"`` or None)."""

    init: bool | str
    alpha_per_r: float
    corda_method: str | None = None
    data: str | None = None


#: The peer rows, by benchmark name. ``peft:lora`` is the control: it must land within our ``lora`` row's seed spread.
PEERS: dict[str, PeftPeer] = {
    "peft:lora": PeftPeer(True, 2.0),
    "peft:pissa": PeftPeer("pissa", 1.0),
    "peft:olora": PeftPeer("olora", 1.0),
    "peft:mica": PeftPeer("mica", 1.0),
    "peft:eva": PeftPeer("eva", 1.0, data="eva"),
    "peft:corda-kpm": PeftPeer("corda", 1.0, corda_method="kpm", data="corda"),
    "peft:corda-ipm": PeftPeer("corda", 1.0, corda_method="ipm", data="corda"),
    "peft:astra": PeftPeer("astra", 1.0, data="astra"),
}


class Refused(RuntimeError):
    """PEFT refused this peer on this model (its own exception's message, prefixed by its type)."""


def lora_config(peer: PeftPeer, r: int, target_names: list[str]):
    """The ``peft.LoraConfig`` of ``peer``: rank ``r`` on exactly the modules named in ``target_names`` (full names,
    so PEFT adapts the layers our own rows adapt), no dropout, no bias."""
    from peft import LoraConfig
    from peft.tuners.lora.config import AstraConfig, CordaConfig, EvaConfig

    extra = {}
    if peer.data == "corda":
        extra["corda_config"] = CordaConfig(corda_method=peer.corda_method)
    elif peer.data == "astra":
        extra["astra_config"] = AstraConfig()
    elif peer.data == "eva":
        extra["eva_config"] = EvaConfig()
    return LoraConfig(r=r, lora_alpha=peer.alpha_per_r * r, lora_dropout=0.0, target_modules=list(target_names),
                      init_lora_weights=peer.init, **extra)


def attach(model: nn.Module, peer: PeftPeer, r: int, target_names: list[str], calibration: list[dict],
           seed: int) -> nn.Module:
    """Give ``model`` (a transformers causal LM, modified in place) the PEFT adapter of ``peer`` and patch it onto the
    fused op. ``calibration``: the batches (dicts of ``input_ids``, ``attention_mask`` on the model's device) the
    data-driven peers calibrate on. ``seed`` seeds PEFT's random draws (LoRA's A). Returns the transformers model
    inside the PEFT wrapper (the same object as ``model``, its target layers now PEFT LoRA layers), whose trainable
    parameters are the adapter's.

    Raises:
        Refused: PEFT raised while building the adapter (its type and message).
    """
    from peft import get_peft_model
    from peft.tuners.lora import initialize_lora_eva_weights
    from peft.tuners.lora.astra import preprocess_astra
    from peft.tuners.lora.corda import preprocess_corda

    from ..integrations.peft import patch

    config = lora_config(peer, r, target_names)

    @torch.no_grad()
    def run_model():
        # One unpadded sequence per call: CorDA's hook takes each call's input as one (tokens, dim) sample
        # (``squeeze(0)``) and neither CorDA nor ASTRA masks padding, so a padded batch would count pad tokens.
        for batch in calibration:
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"].bool()):
                model(input_ids=ids[mask][None], attention_mask=torch.ones_like(ids[mask][None]))

    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        if peer.data == "corda":
            preprocess_corda(model, config, run_model=run_model)
        elif peer.data == "astra":
            preprocess_astra(model, config, run_model=run_model)
        wrapped = get_peft_model(model, config, low_cpu_mem_usage=peer.data == "eva")
        if peer.data == "eva":
            batches = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in calibration]
            initialize_lora_eva_weights(wrapped, batches, forward_fn=_bounded_forward(len(batches)),
                                        show_progress_bar=False)
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as e:
        raise Refused(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    inner = wrapped.get_base_model()
    inner.train(was_training)
    return patch(inner)


#: How many passes over the calibration batches EVA may take. PEFT's EVA cycles over them until every layer's top
#: components stop moving (cosine ≥ tau = 0.99 between two incremental-PCA steps), with no limit of its own; on
#: SmolLM2's 65 calibration sentences it had not converged after 10 minutes.
EVA_MAX_PASSES = 20


def _bounded_forward(n_batches: int):
    """EVA's ``forward_fn`` (``model(**inputs)``, PEFT's default) that raises once it has run
    :data:`EVA_MAX_PASSES` passes over the ``n_batches`` calibration batches."""
    calls = 0

    def forward(model, inputs):
        nonlocal calls
        calls += 1
        if calls > EVA_MAX_PASSES * n_batches:
            raise RuntimeError(f"EVA did not converge in {EVA_MAX_PASSES} passes over the calibration batches (PEFT "
                               "cycles until every layer's components reach cosine ≥ tau = 0.99)")
        return model(**inputs)

    return forward


def fused_summary(model: nn.Module) -> str:
    """How the patched PEFT layers of ``model`` ran so far: ``"30 of 30 layers fused"``, or with the layers that ran
    PEFT's own forward at least once and why (``"28 of 30 layers fused; 2 ran PEFT's forward: merged"``); '' when no
    layer is patched (our own rows)."""
    from ..integrations._instance_forward import _LOGGED, is_patched

    patched = [m for m in model.modules() if is_patched(m)]
    if not patched:
        return ""
    fell_back = [m.__dict__[_LOGGED] for m in patched if m.__dict__.get(_LOGGED)]
    out = f"{len(patched) - len(fell_back)} of {len(patched)} layers fused"
    if fell_back:
        out += f"; {len(fell_back)} ran PEFT's forward: {'; '.join(sorted(set().union(*fell_back)))}"
    return out


def adapter_rows(model: nn.Module) -> list[tuple[nn.Module, torch.Tensor]]:
    """Every adapter layer of ``model`` with its down-projection A (r, in): our ``LoRALinear`` layers and PEFT LoRA
    layers (their single active adapter), in module order, so the leak measurements read both alike."""
    from ..nn import LoRALinear

    out = []
    for m in model.modules():
        if isinstance(m, LoRALinear):
            out.append((m, m.lora_A))
        elif isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and hasattr(m, "active_adapters"):
            active = [a for a in m.active_adapters if a in m.lora_A]
            if len(active) == 1:
                out.append((m, m.lora_A[active[0]].weight))
    return out
