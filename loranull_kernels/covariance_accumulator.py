"""``CovarianceAccumulator``: one layer's streaming input statistic ``C = Σ xᵀx`` for calibration.

Owns the float32 sum, the token and sample counts, the optional per-sample ``1/|max x|`` normalisation of the
LoRA-Null reference code, and the reduction across ``torch.distributed`` ranks. The products run through
:func:`loranull_kernels.covariance_update` (Triton kernel or PyTorch fallback).
"""
from __future__ import annotations

import math

import torch

from .ops.covariance import covariance_update


# Below float32's maximum (≈ 2¹²⁸) with room for the accumulation's rounding: C's entries stay finite.
_OVERFLOW_LIMIT = 2.0**126


class NonFiniteCalibrationError(ValueError):
    """A calibration batch held NaN or ±Inf (in tokens not masked out), or values whose products would overflow
    the float32 statistic; it was not added."""


class CovarianceAccumulator:
    """Streaming uncentred covariance of one layer's inputs.

    Args:
        dim: the layer's input size ``in``; C is ``(in, in)`` float32.
        device: where C lives; None: the device of the first batch (CPU if :meth:`all_reduce` comes first).
        normalize: the LoRA-Null / CorDA reference option: divide each sample by ``|max(sample)|`` (the signed
            maximum over the sample's kept tokens and features, then its absolute value) before accumulating. A
            sample whose maximum is 0 is left as it is. Off by default. It costs a float32 copy of each batch.
        name: the layer's name, used in error messages.

    A *sample* is one entry of the leading dims before the token dim: x of shape (batch, seq, in) holds ``batch``
    samples; a 2-D (tokens, in) batch is one sample. Samples whose tokens are all masked out are not counted.

    Example::

        acc = CovarianceAccumulator(4096, name="layers.0.self_attn.q_proj")
        for x, mask in batches:          # x (batch, seq, 4096), mask (batch, seq) bool
            acc.update(x, mask)
        acc.all_reduce()                 # under torch.distributed: every rank now holds the global sums
        C = acc.finalize()               # Σ x̃ᵀx̃ / n_samples, as the LoRA-Null reference defines it
    """

    def __init__(self, dim: int, *, device: torch.device | str | None = None, normalize: bool = False,
                 name: str = "<unnamed layer>"):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.normalize = bool(normalize)
        self.name = name
        self.tokens = 0
        self.samples = 0
        self._C = None if device is None else torch.zeros(dim, dim, dtype=torch.float32, device=device)

    @property
    def C(self) -> torch.Tensor:
        """The running sum ``Σ x̃ᵀx̃`` (in, in) float32, symmetric (allocated on first use)."""
        if self._C is None:
            self._C = torch.zeros(self.dim, self.dim, dtype=torch.float32)
        return self._C

    @property
    def device(self) -> torch.device | None:
        return None if self._C is None else self._C.device

    def update(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> "CovarianceAccumulator":
        """Add the batch ``x (..., in)`` (tokens where ``token_mask`` (bool, ``x.shape[:-1]``) is False skipped).

        Raises:
            NonFiniteCalibrationError: x has NaN/Inf in a kept token, or values so large that C would overflow
                float32; nothing is added (C and counts unchanged).
            ValueError / TypeError: from :func:`covariance_update` on bad shapes, dtypes or devices.
        """
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"{self.name}: x must be (..., {self.dim}), got {getattr(x, 'shape', type(x).__name__)}")
        if token_mask is not None and (not isinstance(token_mask, torch.Tensor) or token_mask.dtype != torch.bool
                                       or token_mask.shape != x.shape[:-1]):
            raise ValueError(f"{self.name}: token_mask must be a bool tensor of shape {tuple(x.shape[:-1])}")
        if self._C is None:
            self._C = torch.zeros(self.dim, self.dim, dtype=torch.float32, device=x.device)
        if x.numel() == 0:
            return self
        x = x.detach()
        peak = self._check_finite(x, token_mask)
        per_sample = x.reshape(-1, x.shape[-2] if x.dim() >= 2 else 1, self.dim)
        mask3 = None if token_mask is None else token_mask.reshape(per_sample.shape[:-1])
        if self.normalize:
            inp, inp_mask, peak = self._normalized(per_sample, mask3), mask3, 1.0
        else:
            inp, inp_mask = x, token_mask
        self._check_no_overflow(inp, inp_mask, peak)
        covariance_update(self.C, inp, inp_mask)
        if mask3 is None:
            self.tokens += per_sample.shape[0] * per_sample.shape[1]
            self.samples += per_sample.shape[0]
        else:
            kept = mask3.sum(-1)
            self.tokens += int(kept.sum())
            self.samples += int((kept > 0).sum())
        return self

    def _check_finite(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> float | None:
        """Raise on NaN/Inf in a kept token; return ``max |x|`` when every entry is finite (else None).

        One ``aminmax`` pass (NaN propagates through it) settles the usual all-finite batch; only a batch with a
        non-finite entry somewhere is checked token by token (it may sit in masked-out padding)."""
        if not x.is_floating_point():  # covariance_update refuses other dtypes by name
            return None
        lo, hi = torch.aminmax(x)
        lo, hi = (float(v) for v in torch.stack([lo, hi]).tolist())
        if math.isfinite(lo) and math.isfinite(hi):
            return max(-lo, hi)
        finite = torch.isfinite(x).all(dim=-1)
        if token_mask is not None:
            finite = finite | ~token_mask
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise NonFiniteCalibrationError(
                f"layer {self.name!r}: calibration input has NaN/Inf in {bad} token(s); the batch was not added"
            )
        return None

    def _check_no_overflow(self, x: torch.Tensor, token_mask: torch.Tensor | None, peak: float | None) -> None:
        """Refuse a finite batch whose products would overflow C's float32 (``x`` of 1e20 squares to 1e40).

        By Cauchy–Schwarz every entry of C + xᵀx is at most ``max_i (C_ii + Σ_t x_ti²)`` in magnitude (C is a sum
        of Grams), so that diagonal bound below a margin under float32's maximum means no product or partial sum
        can overflow. The bound ``max C_ii + tokens · max|x|²`` settles the usual case; only when it is exceeded
        (or ``peak``, max |x|, is unknown: non-finite masked tokens) are the kept tokens' column sums of squares
        computed, in float64."""
        xt = x.reshape(-1, self.dim)
        if xt.shape[0] == 0 or not xt.is_floating_point():
            return
        diag = self.C.diagonal()
        if peak is not None and float(diag.max()) + xt.shape[0] * peak * peak <= _OVERFLOW_LIMIT:
            return
        if token_mask is not None:
            xt = xt[token_mask.reshape(-1)]
        sumsq = diag.double()
        for chunk in xt.split(4096):
            sumsq = sumsq + chunk.double().square().sum(0)
        worst = float(sumsq.max())
        if not worst <= _OVERFLOW_LIMIT:
            raise NonFiniteCalibrationError(
                f"layer {self.name!r}: calibration input is too large for the float32 statistic (a diagonal entry of "
                f"C would reach {worst:.3g}, float32 overflows at 3.4e38); the batch was not added")

    @staticmethod
    def _normalized(x3: torch.Tensor, mask3: torch.Tensor | None) -> torch.Tensor:
        """``x / |max x|`` per sample, float32; the max is over kept tokens only (padding must not set the scale)."""
        xf = x3.float()
        src = xf if mask3 is None else xf.masked_fill(~mask3.unsqueeze(-1), float("-inf"))
        peak = src.amax(dim=(1, 2)).abs()
        scale = torch.where(torch.isfinite(peak) & (peak > 0), 1.0 / peak, torch.ones_like(peak))
        return xf * scale[:, None, None]

    def mean(self) -> torch.Tensor:
        """``C / tokens``: the per-token second moment ``E[x xᵀ]`` (in, in) float32 (a new tensor)."""
        if self.tokens == 0:
            raise ValueError(f"layer {self.name!r}: empty calibration set (no token was accumulated)")
        return self.C / self.tokens

    def finalize(self, per: str = "sample") -> torch.Tensor:
        """The covariance as the LoRA-Null reference defines it, ``Σ x̃ᵀx̃ / n_samples`` (``per="sample"``), or
        :meth:`mean` (``per="token"``): (in, in) float32, a new tensor. Call :meth:`all_reduce` first when
        calibrating on several ranks."""
        if per == "token":
            return self.mean()
        if per != "sample":
            raise ValueError(f"per must be 'sample' or 'token', got {per!r}")
        if self.samples == 0:
            raise ValueError(f"layer {self.name!r}: empty calibration set (no sample was accumulated)")
        return self.C / self.samples

    def all_reduce(self, group=None) -> "CovarianceAccumulator":
        """Sum C and the counts over the ranks of ``group`` (``torch.distributed``, initialised by the caller), in
        place: afterwards every rank holds the global statistic. Call it once, on every rank, after the local
        updates (a rank without data contributes zeros). With NCCL, C must live on this rank's GPU."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("all_reduce needs an initialised torch.distributed process group")
        if self._C is None and dist.get_backend(group) == "nccl":
            self._C = torch.zeros(self.dim, self.dim, dtype=torch.float32, device=torch.device("cuda", torch.cuda.current_device()))
        # Reduced into copies and committed together: a collective that fails half-way leaves this rank's local
        # statistic intact (C reduced with local counts would be silently wrong, and a retry would count twice).
        C = self.C.clone()
        counts = torch.tensor([self.tokens, self.samples], dtype=torch.int64, device=C.device)
        dist.all_reduce(C, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        tokens, samples = (int(v) for v in counts.tolist())
        self._C, self.tokens, self.samples = C, tokens, samples
        return self
