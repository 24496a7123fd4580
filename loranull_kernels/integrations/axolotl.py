"""axolotl: a plugin that trains axolotl's LoRA / QLoRA runs on the fused op.

In the axolotl YAML config::

    adapter: lora            # or qlora
    plugins:
      - loranull_kernels.integrations.axolotl.LoRANullPlugin

axolotl builds a PEFT LoRA model; after it attached the adapters (``post_lora_load``) the plugin runs
:func:`loranull_kernels.integrations.peft.patch` on it, so every PEFT LoRA linear layer runs the fused op whenever
its state allows (see :mod:`loranull_kernels.integrations.peft`).

axolotl has LoRA kernels of its own (``lora_mlp_kernel``, ``lora_qkv_kernel``, ``lora_o_kernel``): they replace
the forward of the attention and MLP blocks and call the LoRA matrices directly, so PEFT's layers, and with them
ours, never run there. axolotl switches them on by itself for LoRA runs (its config validator
``check_auto_enable_lora_kernels``, which leaves alone any field already set). The plugin therefore sets every one
left unset to ``false`` before validation (``register``), turns off again any one switched on after that
(``pre_model_load``, before axolotl applies them), with one log line each time; and refuses a config that sets
one to ``true`` itself, since the two cannot both run. (``lora_embedding_kernel`` is not set by the plugin, the fused
op having no embedding LoRA; but since axolotl's validator auto-enables kernels only when none of these fields is
set, it is no longer switched on by itself either: set it to ``true`` in the config to keep it.)

Tested with axolotl 0.19.0 (peft 0.20.0, transformers 5.16.1); ``AXOLOTL_TESTED``.
"""
from __future__ import annotations

import logging

from axolotl.integrations.base import BasePlugin

from . import peft as _lkpeft

__all__ = ["LoRANullPlugin", "AXOLOTL_TESTED", "BYPASSING_KERNELS"]

AXOLOTL_TESTED = (">=0.19", "<0.20")
# axolotl's fused LoRA kernels that replace the forward of whole blocks, bypassing PEFT's LoRA layers
BYPASSING_KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")
logger = logging.getLogger(__name__)


class LoRANullPlugin(BasePlugin):
    """axolotl plugin: turn axolotl's own LoRA kernels off and run its PEFT LoRA layers on the fused op."""

    def register(self, cfg: dict):
        """Before axolotl validates ``cfg`` (an unparsed dict): refuse an explicit ``true`` for one of
        :data:`BYPASSING_KERNELS`, set the unset ones to ``false`` (so axolotl's validator does not switch them on).

        Raises:
            ValueError: a config that asks for both (naming the field).
        """
        asked = [k for k in BYPASSING_KERNELS if cfg.get(k) is True]
        if asked:
            raise ValueError(f"loranull_kernels.integrations.axolotl.LoRANullPlugin: {', '.join(asked)}: true "
                             "replaces the attention / MLP forward with axolotl's own LoRA kernels, which bypass "
                             "PEFT's LoRA layers and so the fused op: set it to false (or remove the plugin)")
        unset = [k for k in BYPASSING_KERNELS if cfg.get(k) is None]
        for k in unset:
            cfg[k] = False
        if unset:
            logger.info("loranull_kernels: set %s to false: axolotl's LoRA kernels would bypass the fused op",
                        ", ".join(unset))

    def pre_model_load(self, cfg):
        """After validation and normalisation, before the model (and axolotl's kernel patches) are built: switch
        off any kernel of :data:`BYPASSING_KERNELS` something switched on after :meth:`register`."""
        on = [k for k in BYPASSING_KERNELS if cfg.get(k)]
        for k in on:
            cfg[k] = False
        if on:
            logger.info("loranull_kernels: switched %s off again: axolotl's LoRA kernels would bypass the fused op",
                        ", ".join(on))

    def post_lora_load(self, cfg, model):
        """Patch the PEFT model axolotl just built.

        Raises:
            ValueError: the model holds no PEFT LoRA linear layer (``adapter`` is not ``lora`` / ``qlora``).
        """
        _lkpeft.patch_required(model, "loranull_kernels.integrations.axolotl.LoRANullPlugin",
                               f"adapter is {cfg.get('adapter')!r}: use adapter: lora or qlora, or remove the plugin")
