"""Integrations with other adapter libraries.

Submodules are imported lazily so ``import loranull_kernels`` never imports the library being integrated:
``lk.integrations.peft`` imports peft on first access, ``lk.integrations.transformers`` (the Trainer callback) the
Trainer's modules, ``lk.integrations.litgpt`` litgpt, ``.axolotl`` axolotl, ``.llamafactory`` transformers and PEFT
(LLaMA-Factory itself when its launcher runs). docs/tools.md says how each tool switches the kernels on.
"""
import importlib

__all__ = ["peft", "transformers", "litgpt", "axolotl", "llamafactory"]


def __getattr__(name):
    if name in __all__:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
