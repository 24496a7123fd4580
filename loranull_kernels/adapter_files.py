"""Adapter files: save / load a model's adapters (exports to other formats: :mod:`loranull_kernels.export`).

Format (a directory, :data:`FORMAT_VERSION` 1):

- ``loranull_adapter.safetensors``: per adapted module ``<name>.lora_A`` (r, in), ``<name>.lora_B`` (out, r) and,
  when present, ``<name>.rank_scale`` (r,), ``<name>.mask_A`` / ``<name>.mask_B`` (bool), ``<name>.lora_A0`` /
  ``<name>.lora_B0`` (the initial adapter of base-rewriting methods), ``<name>.bias`` (only when the bias is
  trained), ``<name>.base_fingerprint`` (out,) float64: ``W v`` of the *original* weight W for a fixed random
  ``v``, so loading onto another base is refused, and every other persistent buffer of the layer under its own
  name (the method pieces' state: RoseLoRA's ``rose_*`` importance, LaLoRA's ``lalora_*`` curvature and θ0).
- ``loranull_adapter.json``: format name and version, package version, ``AdapterConfig.to_dict()``, per module
  its shapes, bias, Conv1D layout and base dtype, and ``sha256``: per tensor of the safetensors file, the SHA-256 of
  its dtype, shape and bytes, verified on loading (a tensor overwritten with other finite values is otherwise
  indistinguishable from a trained one). Files written before the digests existed have no ``sha256`` and load as
  before.

Base-rewriting methods (pissa, milora, lora_null, kasa) store no residual base: it is rebuilt at load time as
``W − s·B0A0`` from the model's original weight W and the saved ``B0``, ``A0``, with the very operations
:meth:`LoRALinear.from_linear` used, so loading onto a fresh original model reproduces the saved model's base bit
for bit. The file stays adapter-sized (a residual would be a copy of every targeted weight).

Every directory is written atomically (:mod:`.atomic_dir`): into a temporary directory beside ``path``, then renamed into place, one
writer at a time (an ``flock`` on the parent directory). A process killed mid-save leaves the previous adapter (or
none) at ``path``, never a half-written one that loads; killed between moving the previous adapter aside and renaming
the new one in, it leaves the previous one in a hidden ``.<name>.old-*`` directory beside ``path``, which the next
save or load of ``path`` moves back. Leftover temporary directories are deleted by the next save.

Reading checks everything before the model is touched: the JSON's keys and types, that the tensors can be read, that
every tensor belongs to a listed module and is a field of the format (or state of the config's pieces), each
field's dtype (the adapter's float dtype as saved, bool masks, float64 fingerprints) and shape. Problems are
``ValueError``s naming the file and the key.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import safetensors.torch as st
import torch
from torch import nn

from . import atomic_dir
from ._dtypes import compute_dtype
from .adapter_layers import adapter_layers, single_config
from .config import AdapterConfig
from .methods import METHODS, REGULARIZERS, SPARSITY
from .nn import LoRALinear, QuantizedLoRALinear
from .base_weights import base_weight
from .base_weights.base import fingerprint as _fingerprint
from .targets import check_materialized, is_linear_like, linear_shape

FORMAT = "loranull_kernels.adapter"
FORMAT_VERSION = 1
CONFIG_NAME = "loranull_adapter.json"
WEIGHTS_NAME = "loranull_adapter.safetensors"
# Relative tolerance of the base fingerprint by the base's dtype: above the rounding a rebuilt original weight
# carries, far below the O(1) difference of another model's weight.
_FINGERPRINT_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
_TENSOR_FIELDS = ("lora_A", "lora_B", "rank_scale", "mask_A", "mask_B", "lora_A0", "lora_B0")
_FILE_FIELDS = _TENSOR_FIELDS + ("bias", "base_fingerprint")
# Not piece state: the merge state is the model's, never saved (a merged layer refuses a load).
_KNOWN_FIELDS = _FILE_FIELDS + ("lora_merged",)


def _piece_prefixes(cfg: AdapterConfig) -> tuple[str, ...]:
    """The buffer-name prefixes of the config's pieces' state: only these names may come from a file as state."""
    pieces = (REGULARIZERS.get(cfg.effective_regularizer), SPARSITY.get(cfg.effective_sparsity))
    return tuple(p.state_prefix for p in pieces if p is not None and p.state_prefix)


def _piece_buffers(layer: LoRALinear) -> dict[str, torch.Tensor]:
    """The layer's persistent buffers beyond the fixed fields: the state method pieces register (``rose_*``,
    ``lalora_*``), saved and restored as they are."""
    return {n: t for n, t in layer._buffers.items()
            if t is not None and n not in _KNOWN_FIELDS and n not in layer._non_persistent_buffers_set}


# ----------------------------------------------------------------------------------------------- fingerprints
def _original_weight(layer: LoRALinear) -> torch.Tensor:
    """The pre-trained W (out, in) in the compute dtype, rounded once to the base dtype: that rounding recovers the
    stored W exactly wherever the residual's own rounding error is below half an ulp of W (half-precision bases)."""
    return layer.original_weight().to(layer.base_dtype).to(compute_dtype(layer.base_dtype))


def _layer_fingerprint(layer: LoRALinear) -> torch.Tensor:
    """The fingerprint of the layer's original W: recomputed for a dense base, the one taken when the layer was
    built for a quantized base (whose re-quantized residual no longer gives W exactly)."""
    saved = getattr(layer, "original_fingerprint", None)
    return (saved if saved is not None else _fingerprint(_original_weight(layer))).to("cpu", torch.float64)


def _check_fingerprint(name: str, got: torch.Tensor, saved: torch.Tensor, dtype: torch.dtype,
                       saved_dtype: str) -> None:
    # The looser of the two dtypes: the same model saved in float32 and loaded in float64 (or bf16) must pass.
    rtol = max(_FINGERPRINT_RTOL.get(dtype, 2e-2),
               _FINGERPRINT_RTOL.get(getattr(torch, saved_dtype, None), 2e-2))
    err = (got - saved).norm().item()
    if not err <= rtol * max(saved.norm().item(), 1e-30):
        raise ValueError(f"load_adapter: the base weight of {name!r} is not the one the adapter was trained on "
                         f"(fingerprint differs by {err / max(saved.norm().item(), 1e-30):.2e} relative, tolerance "
                         f"{rtol:.0e} for {dtype}); load it onto the original model")


def cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous CPU tensor, as safetensors writes it."""
    return t.detach().to("cpu").contiguous()


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 (hex) of a CPU tensor's dtype, shape and bytes: what the JSON's ``sha256`` holds per tensor."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -------------------------------------------------------------------------------------------------------- save
def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write every :class:`LoRALinear` adapter of ``model`` to the directory ``path`` (see the module docstring).

    Works on merged layers too (the saved tensors and fingerprints do not depend on the merge state). ``path`` is
    replaced atomically if it holds a previous adapter; a directory with other files is refused.

    Raises:
        ValueError: the model has no adapter, or its adapters have different configs.
        FileExistsError: ``path`` is a file or a directory with other files.
    """
    from . import __version__

    layers = adapter_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRALinear adapter (call lk.inject first)")
    cfg = single_config(layers, "save_adapter / export_peft")
    prefixes = _piece_prefixes(cfg)
    tensors, modules = {}, {}
    for name, layer in layers:
        for field in _TENSOR_FIELDS:
            t = getattr(layer, field)
            if t is not None:
                tensors[f"{name}.{field}"] = cpu_copy(t)
        if layer.bias is not None and layer.bias.requires_grad:
            tensors[f"{name}.bias"] = cpu_copy(layer.bias)
        for field, t in _piece_buffers(layer).items():
            if field.startswith(prefixes):  # the loader accepts exactly the state of the config's pieces
                tensors[f"{name}.{field}"] = cpu_copy(t)
        tensors[f"{name}.base_fingerprint"] = _layer_fingerprint(layer)
        modules[name] = {"in_features": layer.in_features, "out_features": layer.out_features,
                         "bias": layer.bias is not None, "fan_in_fan_out": bool(getattr(layer, "fan_in_fan_out", False)),
                         "base_dtype": str(layer.base_dtype).removeprefix("torch."),
                         "adapter_dtype": str(layer.lora_A.dtype).removeprefix("torch.")}
        if isinstance(layer, QuantizedLoRALinear):  # informational: any kind of base loads it (same fingerprint)
            modules[name]["base_kind"] = layer.base.kind
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "package_version": __version__,
            "config": cfg.to_dict(), "modules": modules,
            "sha256": {key: tensor_digest(t) for key, t in sorted(tensors.items())}}
    with atomic_dir.atomic_directory(path, (CONFIG_NAME, WEIGHTS_NAME), "save_adapter") as tmp:
        st.save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        with open(tmp / CONFIG_NAME, "w") as f:
            json.dump(meta, f, indent=2)


# -------------------------------------------------------------------------------------------------------- load
def _bad(file: Path, what: str) -> ValueError:
    return ValueError(f"{file}: {what}; not a readable loranull_kernels adapter (damaged or written by something "
                      "else)")


def _read_meta(cfg_file: Path) -> tuple[dict, AdapterConfig]:
    try:
        with open(cfg_file, encoding="utf-8") as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _bad(cfg_file, f"invalid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise _bad(cfg_file, f"the JSON is a {type(meta).__name__}, expected an object")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_file} is not a loranull_kernels adapter config (format={meta.get('format')!r})")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{cfg_file} has format_version {version!r}; this version of "
                         f"loranull_kernels reads up to {FORMAT_VERSION} (written by {meta.get('package_version')})")
    if version < 1:  # versions start at 1: a 0 or a negative one was never written by this package
        raise _bad(cfg_file, f"format_version {version} is not a version (they start at 1)")
    for key, kind in (("config", dict), ("modules", dict)):
        if key not in meta:
            raise _bad(cfg_file, f"key {key!r} is missing")
        if not isinstance(meta[key], kind):
            raise _bad(cfg_file, f"key {key!r} is a {type(meta[key]).__name__}, expected an object")
    if not meta["modules"]:
        raise _bad(cfg_file, "key 'modules' is empty")
    digests = meta.get("sha256")
    if digests is not None and not (isinstance(digests, dict) and all(
            isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for k, v in digests.items())):
        raise _bad(cfg_file, "key 'sha256' must map tensor names to SHA-256 hex digests")
    method = meta["config"].get("method")
    if isinstance(method, str) and method not in METHODS:  # a custom method: its fields would look unknown
        raise ValueError(f"{cfg_file}: the adapter was saved with method {method!r}, which is not registered here "
                         f"(registered: {sorted(METHODS)}); register it (lk.methods.register) before loading")
    try:
        cfg = AdapterConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise _bad(cfg_file, f"key 'config' is not a valid AdapterConfig ({e})") from None
    for name, info in meta["modules"].items():
        if not isinstance(info, dict):
            raise _bad(cfg_file, f"modules[{name!r}] is a {type(info).__name__}, expected an object")
        for key in ("in_features", "out_features"):
            v = info.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _bad(cfg_file, f"modules[{name!r}][{key!r}] must be a positive int, got {v!r}")
        if not isinstance(info.get("base_dtype"), str):
            raise _bad(cfg_file, f"modules[{name!r}]['base_dtype'] must be a dtype name, got {info.get('base_dtype')!r}")
        if "adapter_dtype" in info and not isinstance(getattr(torch, str(info["adapter_dtype"]), None), torch.dtype):
            raise _bad(cfg_file, f"modules[{name!r}]['adapter_dtype'] is not a dtype name: {info['adapter_dtype']!r}")
    return meta, cfg


def read_adapter_config(path: str | os.PathLike) -> tuple[AdapterConfig, dict[str, dict]]:
    """The config and the per-module entries (shapes, dtypes) of the adapter directory ``path``, from its JSON
    alone (no tensor is read): for checks before a load, e.g. that a checkpoint fits a model's optimiser state.

    Raises:
        FileNotFoundError: no adapter JSON at ``path``. ValueError: a damaged or foreign JSON (named)."""
    cfg_file = Path(path) / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a loranull_kernels adapter directory (no {CONFIG_NAME})")
    meta, cfg = _read_meta(cfg_file)
    return cfg, meta["modules"]


def _split_key(key: str, modules: dict) -> tuple[str, str] | None:
    module, _, field = key.rpartition(".")
    return (module, field) if module in modules else None


def _check_digests(weights_file: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor against its SHA-256 in the JSON (files that predate the digests have none: not checked)."""
    digests = meta.get("sha256")
    if digests is None:
        return
    missing = sorted(set(digests) - set(tensors))
    if missing:
        raise _bad(weights_file, f"tensor {missing[0]!r} is missing (listed in {CONFIG_NAME}'s sha256)")
    for key, t in tensors.items():
        if key not in digests:
            raise _bad(weights_file, f"tensor {key!r} has no checksum in {CONFIG_NAME}")
        if tensor_digest(t) != digests[key]:
            raise _bad(weights_file, f"tensor {key!r} does not match its SHA-256 in {CONFIG_NAME}: the file was "
                                     "changed or damaged after it was saved")


def _check_keys(weights_file: Path, meta: dict, cfg: AdapterConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor of the file belongs to a listed module and is a field the format defines, with that field's
    dtype: checked before the model is touched."""
    modules = meta["modules"]
    prefixes = _piece_prefixes(cfg)
    for key, t in tensors.items():
        split = _split_key(key, modules)
        if split is None:
            raise _bad(weights_file, f"tensor {key!r} belongs to no module listed in {CONFIG_NAME}")
        name, field = split
        if field not in _FILE_FIELDS and not (field.isidentifier() and field.startswith(prefixes)):
            raise _bad(weights_file, f"tensor {key!r}: {field!r} is not an adapter field (expected one of "
                                     f"{list(_FILE_FIELDS)} or the state of the config's pieces {list(prefixes)})")
    for name, info in modules.items():
        for field in ("lora_A", "lora_B", "base_fingerprint"):
            if f"{name}.{field}" not in tensors:
                raise _bad(weights_file, f"{name}.{field} is missing")
        if (f"{name}.lora_A0" in tensors) != (f"{name}.lora_B0" in tensors):
            raise _bad(weights_file, f"{name} has only one of lora_A0 / lora_B0")
        # The adapter tensors share one float dtype, the one saved (recorded since this check exists); an integer
        # or narrower tensor would be cast silently on loading.
        saved = info.get("adapter_dtype")
        expected = getattr(torch, saved) if saved is not None else tensors[f"{name}.lora_B"].dtype
        for field in ("lora_A", "lora_B", "rank_scale", "lora_A0", "lora_B0"):
            t = tensors.get(f"{name}.{field}")
            if t is not None and (t.dtype != expected or not t.dtype.is_floating_point):
                raise _bad(weights_file, f"{name}.{field} has dtype {t.dtype}; the adapter was saved in {expected}")
            if t is not None and not bool(torch.isfinite(t).all()):
                raise _bad(weights_file, f"{name}.{field} holds NaN or Inf")
        for field, ok, desc in (("mask_A", lambda d: d == torch.bool, "torch.bool"),
                                ("mask_B", lambda d: d == torch.bool, "torch.bool"),
                                ("base_fingerprint", lambda d: d == torch.float64, "torch.float64"),
                                ("bias", lambda d: d.is_floating_point, "a float dtype")):
            t = tensors.get(f"{name}.{field}")
            if t is not None and not ok(t.dtype):
                raise _bad(weights_file, f"{name}.{field} has dtype {t.dtype}, expected {desc}")
            if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise _bad(weights_file, f"{name}.{field} holds NaN or Inf")


def _read(path: str | os.PathLike) -> tuple[dict, AdapterConfig, dict[str, torch.Tensor]]:
    path = atomic_dir.target_path(path, "load_adapter")
    cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not os.path.lexists(path) and any(atomic_dir.leftovers(path)):  # a save of path was killed mid-way: undo it
        with atomic_dir.locked_parent(path):
            atomic_dir.recover(path)
    if not cfg_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(f"{path} is not a loranull_kernels adapter directory (needs {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME}; a PEFT directory loads with peft.PeftModel.from_pretrained)")
    meta, cfg = _read_meta(cfg_file)
    try:
        tensors = st.load_file(str(weights_file))
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on damaged files
        raise _bad(weights_file, f"the tensors cannot be read ({type(e).__name__}: {e})") from None
    _check_digests(weights_file, meta, tensors)
    _check_keys(weights_file, meta, cfg, tensors)
    return meta, cfg, tensors


def _check_saved_shapes(file: Path, name: str, info: dict, cfg: AdapterConfig, tensors: dict) -> None:
    i, o, r = info["in_features"], info["out_features"], cfg.r
    expect = {"lora_A": (r, i), "lora_B": (o, r), "rank_scale": (r,), "mask_A": (r, i), "mask_B": (o, r),
              "lora_A0": (r, i), "lora_B0": (o, r), "bias": (o,), "base_fingerprint": (o,),
              "rose_imp_A": (r, i), "rose_imp_B": (o, r), "rose_updates": ()}
    for field, shape in expect.items():
        t = tensors.get(f"{name}.{field}")
        if t is not None and tuple(t.shape) != shape:
            raise _bad(file, f"{name}.{field} has shape {tuple(t.shape)}, expected {shape} (r={r}, "
                             f"in={i}, out={o})")


def _empty_layer(module: nn.Module, cfg: AdapterConfig, has_rank_scale: bool, share: bool) -> LoRALinear:
    """A LoRALinear on ``module``'s base and no initialiser run (its adapter tensors come from a file). A quantized
    base is kept; a dense one is copied, unless ``share`` (the file does not rewrite this base) and it is an
    ``nn.Linear``: then the layer holds the module's own ``weight`` Parameter, as ``inject`` does, so the module
    kept for a rollback costs no memory."""
    base = base_weight(module)
    if base.quantized_format is not None:
        layer = QuantizedLoRALinear(module, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, method=cfg.method,
                                    use_rslora=cfg.use_rslora, has_rank_scale=has_rank_scale,
                                    base_correction=cfg.quantized_rewrite == "low_rank")
        layer.original_fingerprint = _fingerprint(base.dense().to(compute_dtype(base.dtype)))
    else:
        W = base.dense()
        layer = LoRALinear(base.in_features, base.out_features, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                           bias=base.bias is not None, method=cfg.method, use_rslora=cfg.use_rslora,
                           has_rank_scale=has_rank_scale, device=W.device, dtype=W.dtype)
        with torch.no_grad():
            if share and isinstance(module, nn.Linear):
                layer.weight = module.weight
            else:
                layer.weight.copy_(W)
            if base.bias is not None:  # copied (small): a trained bias from the file must not reach the kept module
                layer.bias.copy_(base.bias)
    layer.lora_A.requires_grad_(not cfg.freeze_A)
    if layer.bias is not None:
        layer.bias.requires_grad_(cfg.train_bias)
    layer.adapter_config = cfg
    return layer


@torch.no_grad()
def _assign(layer: LoRALinear, name: str, tensors: dict[str, torch.Tensor]) -> None:
    dev, adt = layer.lora_A.device, layer.lora_A.dtype
    get = lambda field: tensors.get(f"{name}.{field}")  # noqa: E731
    layer.lora_A.copy_(get("lora_A").to(dev, adt))
    layer.lora_B.copy_(get("lora_B").to(dev, adt))
    if layer.rank_scale is not None:
        layer.rank_scale.copy_(get("rank_scale").to(dev, adt))
    for field in ("mask_A", "mask_B"):
        t = get(field)
        setattr(layer, field, None if t is None else t.to(dev, torch.bool))
    if get("bias") is not None:
        layer.bias.copy_(get("bias").to(dev, layer.bias.dtype))
    for field in _piece_buffers(layer):  # the file's piece state replaces the layer's, stale entries included
        del layer._buffers[field]
    prefix = f"{name}."
    for key, t in tensors.items():
        field = key[len(prefix):]
        if key.startswith(prefix) and "." not in field and field not in _KNOWN_FIELDS:
            layer.register_buffer(field, t.to(dev))
    layer.attach_pieces()  # state a file from before the first optimiser step lacks starts afresh
    A0, B0 = get("lora_A0"), get("lora_B0")
    if A0 is None:
        if layer.lora_A0 is not None:  # cannot happen for one method; kept so a stale residual is never left
            if not isinstance(layer, QuantizedLoRALinear):
                layer.weight.copy_(_original_weight(layer))
            elif layer.base_rewritten:
                layer.replace_base(_original_weight(layer), _original_weight(layer), layer.lora_B0 * 0, layer.lora_A0)
            layer.lora_A0 = layer.lora_B0 = None
        return
    A0, B0 = A0.to(dev, adt), B0.to(dev, adt)
    if layer.lora_A0 is not None and torch.equal(layer.lora_A0, A0) and torch.equal(layer.lora_B0, B0):
        return  # the base already is W − s·B0A0 for these very B0, A0
    cd = compute_dtype(layer.base_dtype)
    W = _original_weight(layer)  # exact: load_adapter refused quantized layers whose base was rewritten
    # The same operations as the initialisers' `weight - scaling * (B @ A)`: a bit-identical residual.
    residual = W - layer.scaling * (B0.to(cd) @ A0.to(cd))
    if isinstance(layer, QuantizedLoRALinear):
        # As from_base: the base stays as loaded with the "low_rank" correction, and when B0 = 0 (LoRA-Null's basis
        # init); otherwise it becomes the re-quantized residual.
        if not layer.base_correction and bool(B0.any()):
            layer.replace_base(residual, original=W, B0=B0, A0=A0)
    else:
        layer.weight.copy_(residual)
    layer.lora_A0, layer.lora_B0 = A0.clone(), B0.clone()


def _rewrites_base(tensors: dict[str, torch.Tensor], name: str) -> bool:
    """Whether the file's adapter of ``name`` rewrote its base: a non-zero ``lora_B0`` (LoRA-Null's basis init
    saves a zero one)."""
    B0 = tensors.get(f"{name}.lora_B0")
    return B0 is not None and bool(B0.any())


def _check_quantized_residual(name: str, layer: LoRALinear, tensors: dict) -> None:
    """A quantized layer whose base holds a re-quantized residual no longer knows its original W exactly, so it
    cannot take another ``B0A0``: refuse that before anything changes."""
    if not isinstance(layer, QuantizedLoRALinear) or not layer.base_rewritten:
        return
    A0, B0 = tensors.get(f"{name}.lora_A0"), tensors.get(f"{name}.lora_B0")
    same = (A0 is not None and layer.lora_A0 is not None
            and torch.equal(layer.lora_A0.cpu(), A0.to(layer.lora_A0.dtype))
            and torch.equal(layer.lora_B0.cpu(), B0.to(layer.lora_B0.dtype)))
    if not same:
        raise ValueError(f"load_adapter: {name!r} keeps its base re-quantized (the residual of another adapter, or a "
                         "merge, even one undone), from which the original weight cannot be recovered exactly; load "
                         "this adapter onto the original quantized model (freshly loaded)")


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the adapter saved at ``path`` into ``model``; returns ``model``.

    ``model`` is either the original model (its targeted layers are replaced by adapters built from the saved
    config, without running any initialiser or calibration: the saved tensors are the adapter) or a model that
    already holds adapters on the same modules with the same method, r and scaling (their tensors are replaced;
    other settings such as dropout stay the model's). Residual bases of base-rewriting methods are rebuilt from the
    original weight (see the module docstring). Everything is checked before anything is modified.

    Raises:
        FileNotFoundError: ``path`` is not an adapter directory.
        ValueError: another method / r / scaling, a module missing or of another shape, merged adapter layers
            (unmerge first), or a base whose weights are not the ones the adapter was saved from.
    """
    meta, cfg, tensors = _read(path)
    modules: dict[str, dict] = meta["modules"]
    has_rank_scale = {n: f"{n}.rank_scale" in tensors for n in modules}
    for name, info in modules.items():
        _check_saved_shapes(Path(path) / WEIGHTS_NAME, name, info, cfg, tensors)
    layers = dict(adapter_layers(model))
    if layers:
        missing, extra = sorted(set(modules) - set(layers)), sorted(set(layers) - set(modules))
        if missing or extra:
            raise ValueError(f"load_adapter: the model's adapters are on other modules than the saved ones "
                             f"(saved but absent: {missing[:4]}, present but not saved: {extra[:4]})")
        for name, layer in layers.items():
            info = modules[name]
            if layer.method != cfg.method:
                raise ValueError(f"load_adapter: {name!r} has method {layer.method!r}, the file {cfg.method!r}")
            if layer.r != cfg.r or not math.isclose(layer.scaling, cfg.scaling, rel_tol=1e-12):
                raise ValueError(f"load_adapter: {name!r} has r={layer.r}, scaling={layer.scaling:g}; the file "
                                 f"r={cfg.r}, scaling={cfg.scaling:g}")
            if (layer.in_features, layer.out_features) != (info["in_features"], info["out_features"]):
                raise ValueError(f"load_adapter: {name!r} is ({layer.in_features} → {layer.out_features}), the file "
                                 f"({info['in_features']} → {info['out_features']})")
            if (layer.rank_scale is not None) != has_rank_scale[name]:
                raise ValueError(f"load_adapter: {name!r} and the file disagree on having a rank_scale")
            if layer.merged:
                raise ValueError(f"load_adapter: {name!r} is merged; call unmerge() before loading an adapter")
            _check_fingerprint(name, _layer_fingerprint(layer), tensors[f"{name}.base_fingerprint"],
                               layer.base_dtype, info["base_dtype"])
            _check_quantized_residual(name, layer, tensors)
            if (isinstance(layer, QuantizedLoRALinear) and _rewrites_base(tensors, name)
                    and layer.base_correction != (cfg.quantized_rewrite == "low_rank")):
                # The two modes give outputs apart by the residual's quantization error: never mix them silently
                mode = "low_rank" if layer.base_correction else "requantize"
                raise ValueError(f"load_adapter: {name!r} was built with quantized_rewrite={mode!r}, the file with "
                                 f"{cfg.quantized_rewrite!r}; load it onto a freshly loaded quantized model, or inject "
                                 "with the file's quantized_rewrite")
        for name, layer in layers.items():
            _assign(layer, name, tensors)
        return model
    targets = []
    for name, info in modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"load_adapter: the model has no module {name!r} (saved from another architecture?)") from None
        if not is_linear_like(module):
            raise ValueError(f"load_adapter: {name!r} is a {type(module).__name__}, not a linear layer")
        shape = linear_shape(module)
        if shape != (info["in_features"], info["out_features"]):
            raise ValueError(f"load_adapter: {name!r} is ({shape[0]} → {shape[1]}), the file "
                             f"({info['in_features']} → {info['out_features']}): another base model")
        if cfg.r > min(shape):  # the layer constructor would refuse it after earlier layers were replaced
            raise ValueError(f"load_adapter: the file's r={cfg.r} exceeds min(in, out) = {min(shape)} of {name!r}")
        check_materialized([(name, module)], "load_adapter")
        W = base_weight(module).dense()
        _check_fingerprint(name, _fingerprint(W.to(compute_dtype(W.dtype))), tensors[f"{name}.base_fingerprint"],
                           W.dtype, info["base_dtype"])
        refusal = base_weight(module).requantize_refusal() if cfg.quantized_rewrite == "requantize" else None
        if refusal and _rewrites_base(tensors, name):
            raise ValueError(f"load_adapter: the adapter of {name!r} rewrote its base ({cfg.method!r}), but "
                             f"{refusal}: load it onto a dense or bitsandbytes-quantized copy of the model")
        targets.append((name, module))
    from .inject import _transactional, replace_targets
    from .rollback import Rollback

    def make_layer(name: str, module: nn.Module) -> LoRALinear:
        return _empty_layer(module, cfg, has_rank_scale[name], share=not _rewrites_base(tensors, name))

    # Interrupted half-way (Ctrl-C, out of memory), the model is left as it was; unless keeping the replaced layers
    # (only those whose base the file rewrites cost memory) would not fit, as for inject(transactional="auto").
    if not _transactional("auto", targets, cfg, who="load_adapter"):
        replace_targets(model, targets, make_layer)
        for name, _ in targets:
            _assign(model.get_submodule(name), name, tensors)
        return model
    with Rollback(model) as rollback:
        replace_targets(model, targets, make_layer, rollback=rollback)
        for name, _ in targets:
            _assign(model.get_submodule(name), name, tensors)
    return model
