"""Adapter files: save / load a model's adapters, and export them as a plain LoRA that PEFT (or vLLM) loads.

Format (a directory, :data:`FORMAT_VERSION` 1):

- ``loranull_adapter.safetensors``: per adapted module ``<name>.lora_A`` (r, in), ``<name>.lora_B`` (out, r) and,
  when present, ``<name>.rank_scale`` (r,), ``<name>.mask_A`` / ``<name>.mask_B`` (bool), ``<name>.lora_A0`` /
  ``<name>.lora_B0`` (the initial adapter of base-rewriting methods), ``<name>.bias`` (only when the bias is
  trained), ``<name>.base_fingerprint`` (out,) float64: ``W v`` of the *original* weight W for a fixed random
  ``v``, so loading onto another base is refused, and every other persistent buffer of the layer under its own
  name (the method pieces' state: RoseLoRA's ``rose_*`` importance, LaLoRA's ``lalora_*`` curvature and θ0).
- ``loranull_adapter.json``: format name and version, package version, ``AdapterConfig.to_dict()``, and per module
  its shapes, bias, Conv1D layout and base dtype.

Base-rewriting methods (pissa, milora, lora_null, kasa) store no residual base: it is rebuilt at load time as
``W − s·B0A0`` from the model's original weight W and the saved ``B0``, ``A0``, with the very operations
:meth:`LoRALinear.from_linear` used, so loading onto a fresh original model reproduces the saved model's base bit
for bit. The file stays adapter-sized (a residual would be a copy of every targeted weight).

Every directory is written atomically: into a temporary directory beside ``path``, then renamed into place, one
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

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import safetensors.torch as st
import torch
from torch import nn

from .config import AdapterConfig
from .nn import LoRALinear, _compute_dtype
from .targets import as_linear, is_linear_like, linear_shape

FORMAT = "loranull_kernels.adapter"
FORMAT_VERSION = 1
CONFIG_NAME = "loranull_adapter.json"
WEIGHTS_NAME = "loranull_adapter.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
_FINGERPRINT_SEED = 20240601
# Relative tolerance of the base fingerprint by the base's dtype: above the rounding a rebuilt original weight
# carries, far below the O(1) difference of another model's weight.
_FINGERPRINT_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
_TENSOR_FIELDS = ("lora_A", "lora_B", "rank_scale", "mask_A", "mask_B", "lora_A0", "lora_B0")
_FILE_FIELDS = _TENSOR_FIELDS + ("bias", "base_fingerprint")
# Not piece state: the merge state is the model's, never saved (a merged layer refuses a load).
_KNOWN_FIELDS = _FILE_FIELDS + ("lora_merged",)
# The buffer-name prefixes of each piece's state (only these names may come from a file as piece state).
_PIECE_STATE_PREFIXES = {"roselora": "rose_", "lalora": "lalora_"}


def _piece_prefixes(cfg: AdapterConfig) -> tuple[str, ...]:
    return tuple(_PIECE_STATE_PREFIXES[p] for p in (cfg.effective_sparsity, cfg.effective_regularizer)
                 if p in _PIECE_STATE_PREFIXES)


def _piece_buffers(layer: LoRALinear) -> dict[str, torch.Tensor]:
    """The layer's persistent buffers beyond the fixed fields: the state method pieces register (``rose_*``,
    ``lalora_*``), saved and restored as they are."""
    return {n: t for n, t in layer._buffers.items()
            if t is not None and n not in _KNOWN_FIELDS and n not in layer._non_persistent_buffers_set}


# ----------------------------------------------------------------------------------------------------- helpers
def adapter_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """The ``(name, LoRALinear)`` pairs of ``model``, in ``named_modules`` order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _layer_config(layer: LoRALinear) -> AdapterConfig:
    cfg = getattr(layer, "adapter_config", None)
    if cfg is not None:
        return cfg
    return AdapterConfig(method=layer.method, r=layer.r, alpha=layer.alpha, dropout=layer.dropout,
                         use_rslora=layer.use_rslora, freeze_A=not layer.lora_A.requires_grad)


def _model_config(layers: list[tuple[str, LoRALinear]]) -> AdapterConfig:
    configs = {json.dumps(_layer_config(l).to_dict(), sort_keys=True): n for n, l in layers}
    if len(configs) > 1:
        raise ValueError(f"the model's adapters have {len(configs)} different configs (e.g. layers "
                         f"{list(configs.values())[:2]}); save_adapter / export_peft need one AdapterConfig")
    return _layer_config(layers[0][1])


def _fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """``W v`` (out,) float64 on the CPU for a fixed pseudo-random ``v``: a cheap signature of W (out, in)."""
    v = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(_FINGERPRINT_SEED), dtype=torch.float64)
    return (weight @ v.to(weight.device, weight.dtype)).to(torch.float64).cpu()


def _original_weight(layer: LoRALinear) -> torch.Tensor:
    """The pre-trained W (out, in) in the compute dtype, rounded once to the base dtype: that rounding recovers the
    stored W exactly wherever the residual's own rounding error is below half an ulp of W (half-precision bases)."""
    return layer.original_weight().to(layer.weight.dtype).to(_compute_dtype(layer.weight.dtype))


def _check_fingerprint(name: str, weight: torch.Tensor, saved: torch.Tensor, dtype: torch.dtype,
                       saved_dtype: str) -> None:
    got = _fingerprint(weight)
    # The looser of the two dtypes: the same model saved in float32 and loaded in float64 (or bf16) must pass.
    rtol = max(_FINGERPRINT_RTOL.get(dtype, 2e-2),
               _FINGERPRINT_RTOL.get(getattr(torch, saved_dtype, None), 2e-2))
    err = (got - saved).norm().item()
    if not err <= rtol * max(saved.norm().item(), 1e-30):
        raise ValueError(f"load_adapter: the base weight of {name!r} is not the one the adapter was trained on "
                         f"(fingerprint differs by {err / max(saved.norm().item(), 1e-30):.2e} relative, tolerance "
                         f"{rtol:.0e} for {dtype}); load it onto the original model")


def _target_path(path, what: str) -> Path:
    """``path`` resolved (symlinks followed), refused when replacing it would move the working directory away."""
    try:
        resolved = Path(os.path.realpath(os.fspath(path)))
    except TypeError:
        raise TypeError(f"{what}: path must be a str or os.PathLike, got {type(path).__name__}") from None
    cwd = Path(os.path.realpath(os.getcwd()))
    if resolved == cwd or resolved in cwd.parents:
        raise ValueError(f"{what}: path {os.fspath(path)!r} is the current working directory or one of its parents "
                         f"({resolved}); the adapter directory is replaced as a whole: name a subdirectory")
    return resolved


@contextlib.contextmanager
def _locked_parent(path: Path):
    """An exclusive advisory lock (``flock``) on ``path``'s parent directory while saving or recovering: one
    writer at a time, and a writer that dies releases it. No lock where ``fcntl`` is unavailable."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; saves there are not protected against each other
        yield
        return
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _leftovers(path: Path) -> tuple[list[Path], list[Path]]:
    """The ``(tmp, old)`` directories killed saves of ``path`` left beside it (mkdtemp names: 8 random chars)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-[a-z0-9_]{{8}}")
    found: dict[str, list[Path]] = {"tmp": [], "old": []}
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(path.parent):
            m = pattern.fullmatch(entry.name)
            if m and entry.is_dir(follow_symlinks=False):
                found[m.group(1)].append(Path(entry.path))
    return found["tmp"], found["old"]


def _recover(path: Path) -> None:
    """Undo what a killed save left (call with the parent locked). A save killed between moving the previous
    adapter aside and renaming the new one into place leaves no ``path``: the previous adapter is moved back (the
    interrupted save did not happen). Unfinished temporary directories and the leftovers of finished saves are
    deleted."""
    tmps, olds = _leftovers(path)
    if not os.path.lexists(path):
        for old in sorted(olds, key=lambda d: d.stat().st_mtime, reverse=True):
            if (old / path.name).is_dir():
                os.rename(old / path.name, path)
                break
    for d in tmps + olds:
        shutil.rmtree(d, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # make renames durable where directories can be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _atomic_directory(path: str | os.PathLike, allowed: tuple[str, ...], what: str):
    """Yield a fresh temporary directory beside ``path``; on success rename it to ``path`` (replacing a previous
    directory that holds only ``allowed`` files); on error delete it and leave ``path`` untouched.

    A process killed at any point leaves the previous directory at ``path`` or beside it, in
    ``.<name>.old-*/<name>``; the next save or load of ``path`` puts it back (:func:`_recover`)."""
    path = _target_path(path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked_parent(path):
        _recover(path)
        if os.path.lexists(path):
            if not path.is_dir():
                raise FileExistsError(f"{path} exists and is not a directory")
            extra = sorted(set(os.listdir(path)) - set(allowed))
            if extra:
                raise FileExistsError(f"{path} exists and holds other files ({extra[:5]}); refusing to replace it")
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            yield tmp
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(tmp)
            if os.path.lexists(path):
                old_root = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                os.rename(path, old_root / path.name)
                try:
                    os.rename(tmp, path)
                except BaseException:
                    os.rename(old_root / path.name, path)
                    raise
                _fsync_dir(path.parent)
                shutil.rmtree(old_root, ignore_errors=True)
            else:
                os.rename(tmp, path)
            _fsync_dir(path.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


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
    cfg = _model_config(layers)
    prefixes = _piece_prefixes(cfg)
    tensors, modules = {}, {}
    for name, layer in layers:
        for field in _TENSOR_FIELDS:
            t = getattr(layer, field)
            if t is not None:
                tensors[f"{name}.{field}"] = _cpu(t)
        if layer.bias is not None and layer.bias.requires_grad:
            tensors[f"{name}.bias"] = _cpu(layer.bias)
        for field, t in _piece_buffers(layer).items():
            if field.startswith(prefixes):  # the loader accepts exactly the state of the config's pieces
                tensors[f"{name}.{field}"] = _cpu(t)
        tensors[f"{name}.base_fingerprint"] = _fingerprint(_original_weight(layer))
        modules[name] = {"in_features": layer.in_features, "out_features": layer.out_features,
                         "bias": layer.bias is not None, "fan_in_fan_out": bool(getattr(layer, "fan_in_fan_out", False)),
                         "base_dtype": str(layer.weight.dtype).removeprefix("torch."),
                         "adapter_dtype": str(layer.lora_A.dtype).removeprefix("torch.")}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "package_version": __version__,
            "config": cfg.to_dict(), "modules": modules}
    with _atomic_directory(path, (CONFIG_NAME, WEIGHTS_NAME), "save_adapter") as tmp:
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
    for key, kind in (("config", dict), ("modules", dict)):
        if key not in meta:
            raise _bad(cfg_file, f"key {key!r} is missing")
        if not isinstance(meta[key], kind):
            raise _bad(cfg_file, f"key {key!r} is a {type(meta[key]).__name__}, expected an object")
    if not meta["modules"]:
        raise _bad(cfg_file, "key 'modules' is empty")
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


def _split_key(key: str, modules: dict) -> tuple[str, str] | None:
    module, _, field = key.rpartition(".")
    return (module, field) if module in modules else None


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
    path = _target_path(path, "load_adapter")
    cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not os.path.lexists(path) and any(_leftovers(path)):  # a save of path was killed mid-way: undo it
        with _locked_parent(path):
            _recover(path)
    if not cfg_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(f"{path} is not a loranull_kernels adapter directory (needs {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME}; a PEFT directory loads with peft.PeftModel.from_pretrained)")
    meta, cfg = _read_meta(cfg_file)
    try:
        tensors = st.load_file(str(weights_file))
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on damaged files
        raise _bad(weights_file, f"the tensors cannot be read ({type(e).__name__}: {e})") from None
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


def _empty_layer(linear: nn.Linear, cfg: AdapterConfig, has_rank_scale: bool) -> LoRALinear:
    """A LoRALinear with ``linear``'s weight and bias and no initialiser run (its adapter tensors come from a file)."""
    W = linear.weight
    layer = LoRALinear(linear.in_features, linear.out_features, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                       bias=linear.bias is not None, method=cfg.method, use_rslora=cfg.use_rslora,
                       has_rank_scale=has_rank_scale, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        layer.weight.copy_(W)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
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
            layer.weight.copy_(_original_weight(layer))
            layer.lora_A0 = layer.lora_B0 = None
        return
    A0, B0 = A0.to(dev, adt), B0.to(dev, adt)
    if layer.lora_A0 is not None and torch.equal(layer.lora_A0, A0) and torch.equal(layer.lora_B0, B0):
        return  # the base already is W − s·B0A0 for these very B0, A0
    cd = _compute_dtype(layer.weight.dtype)
    W = _original_weight(layer)
    # The same operations as the initialisers' `weight - scaling * (B @ A)`: a bit-identical residual.
    layer.weight.copy_(W - layer.scaling * (B0.to(cd) @ A0.to(cd)))
    layer.lora_A0, layer.lora_B0 = A0.clone(), B0.clone()


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
            _check_fingerprint(name, _original_weight(layer), tensors[f"{name}.base_fingerprint"],
                               layer.weight.dtype, info["base_dtype"])
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
        W = as_linear(module).weight.detach()
        _check_fingerprint(name, W.to(_compute_dtype(W.dtype)), tensors[f"{name}.base_fingerprint"], W.dtype,
                           info["base_dtype"])
        targets.append((name, module))
    from .inject import replace_targets

    replace_targets(model, targets, lambda name, lin: _empty_layer(lin, cfg, has_rank_scale[name]))
    for name, _ in targets:
        _assign(model.get_submodule(name), name, tensors)
    return model


# ------------------------------------------------------------------------------------------------------ export
def to_plain_lora(layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The layer's change to its *original* weight as a plain LoRA: ``(A', B', scaling)`` with
    ``scaling · B' A' = (weight + delta_weight()) − original_weight()``.

    Masks are folded into A and B, ``rank_scale`` into B. For base-rewriting methods (``lora_A0`` set: pissa,
    milora, lora_null, kasa) the rank doubles: ``A' = [A; A0]`` (2r, in), ``B' = [B, −B0]`` (out, 2r), i.e.
    ``ΔW = s(BA − B0A0)``; otherwise ``A'`` (r, in), ``B'`` (out, r). Computed in float32 (float64 for float64
    layers); ``scaling`` is the layer's ``s``. Independent of the merge state.
    """
    if not isinstance(layer, LoRALinear):
        raise TypeError(f"to_plain_lora needs a LoRALinear, got {type(layer).__name__}")
    cd = _compute_dtype(layer.weight.dtype)
    A, B = layer.effective_factors(cd)
    if layer.lora_A0 is not None:
        A = torch.cat([A, layer.lora_A0.to(cd)], dim=0)
        B = torch.cat([B, -layer.lora_B0.to(cd)], dim=1)
    return A, B, layer.scaling


def export_peft(model: nn.Module, path: str | os.PathLike) -> None:
    """Write a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``, PEFT's key layout
    ``base_model.model.<module>.lora_{A,B}.weight``) that ``peft.PeftModel.from_pretrained(original_model, path)``
    loads to the same outputs as ``model``; vLLM and other LoRA consumers read the same files.

    The adapter is :func:`to_plain_lora` of every layer, on the ORIGINAL base: rank 2r for base-rewriting methods,
    ``lora_alpha = s · rank`` with ``use_rslora = False`` so PEFT's ``lora_alpha / r`` reproduces ``s`` exactly.
    Trained biases are exported with ``bias = "lora_only"``. Merged layers export the same as unmerged ones (only
    adapter tensors are read). Inference is identical; when training continues in PEFT with dropout > 0, PEFT's
    dropout also applies to the ``−B0A0`` half, which ours keeps in the (dropout-free) base.

    Raises:
        ValueError: the model has no adapter. FileExistsError: as :func:`save_adapter`.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("export_peft: the model has no LoRALinear adapter")
    cfg = _model_config(layers)
    tensors, ranks, scalings = {}, set(), set()
    train_bias = False
    for name, layer in layers:
        A, B, s = to_plain_lora(layer)
        ranks.add(A.shape[0])
        scalings.add(s)
        dt = layer.lora_A.dtype
        tensors[f"base_model.model.{name}.lora_A.weight"] = _cpu(A.to(dt))
        tensors[f"base_model.model.{name}.lora_B.weight"] = _cpu(B.to(dt))
        if layer.bias is not None and layer.bias.requires_grad:
            train_bias = True
            tensors[f"base_model.model.{name}.base_layer.bias"] = _cpu(layer.bias)
    if len(ranks) > 1 or len(scalings) > 1:
        raise ValueError(f"export_peft: layers convert to different ranks {sorted(ranks)} / scalings; one "
                         "AdapterConfig per model is supported")
    rank, s = ranks.pop(), scalings.pop()
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "r": rank,
        "lora_alpha": s * rank,
        "use_rslora": False,
        "lora_dropout": cfg.dropout,
        "target_modules": [n for n, _ in layers],
        "fan_in_fan_out": any(getattr(l, "fan_in_fan_out", False) for _, l in layers),
        "bias": "lora_only" if train_bias else "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    with _atomic_directory(path, (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME), "export_peft") as tmp:
        st.save_file(tensors, str(tmp / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        with open(tmp / PEFT_CONFIG_NAME, "w") as f:
            json.dump(peft_config, f, indent=2)
