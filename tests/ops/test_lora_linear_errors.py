"""Bad input to lora_linear raises a clear TypeError/ValueError naming the argument (never a wrong answer or a
Triton compile trace)."""
import pytest
import torch

import loranull_kernels as lk


def good(**over):
    K, N, r = 12, 10, 3
    args = dict(x=torch.randn(4, K), weight=torch.randn(N, K), lora_A=torch.randn(r, K), lora_B=torch.randn(N, r),
                scaling=2.0, bias=torch.randn(N), dropout_p=0.1, rank_scale=torch.randn(r),
                mask_A=torch.ones(r, K, dtype=torch.bool), mask_B=torch.ones(N, r, dtype=torch.bool), seed=1)
    args.update(over)
    return args


CASES = [
    (dict(x=torch.randn(4, 13)), ValueError, "x's last dimension"),
    (dict(x=torch.randint(0, 3, (4, 12))), TypeError, "x has dtype"),
    (dict(x=[1.0] * 12), TypeError, "x must be a torch.Tensor"),
    (dict(weight=torch.randn(10, 12, dtype=torch.float64)), TypeError, "weight has dtype"),
    (dict(weight=torch.randn(10, 12, requires_grad=True)), ValueError, "weight requires grad"),
    (dict(weight=torch.randn(10, 12, 1)), ValueError, "weight must have 2"),
    (dict(lora_A=torch.randn(3, 11)), ValueError, "lora_A must be"),
    (dict(lora_A=torch.randn(3, 12, dtype=torch.float16)), TypeError, "lora_A has dtype"),
    (dict(lora_B=torch.randn(10, 4)), ValueError, "lora_B must be"),
    (dict(lora_B=torch.randn(9, 3)), ValueError, "lora_B must be"),
    (dict(lora_B=torch.randn(10, 3, dtype=torch.float64)), TypeError, "lora_B has dtype"),
    (dict(rank_scale=torch.randn(4)), ValueError, "rank_scale must have shape"),
    (dict(rank_scale=torch.randn(3, 1)), ValueError, "rank_scale must have 1"),
    (dict(bias=torch.randn(11)), ValueError, "bias must have shape"),
    (dict(bias=torch.randn(10, dtype=torch.float64)), TypeError, "bias has dtype"),
    (dict(mask_A=torch.ones(3, 12)), TypeError, "mask_A has dtype"),
    (dict(mask_A=torch.ones(3, 11, dtype=torch.bool)), ValueError, "mask_A must have the shape"),
    (dict(mask_B=torch.ones(3, 10, dtype=torch.bool)), ValueError, "mask_B must have the shape"),
    (dict(dropout_p=1.0), ValueError, "dropout_p must be in"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p must be in"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p must be a real number"),
    (dict(scaling=torch.tensor(2.0)), TypeError, "scaling must be a real number"),
    (dict(seed=-1), ValueError, "seed must be in"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(train_A=1), TypeError, "train_A must be a bool"),
    (dict(scaling=float("nan")), ValueError, "scaling must be finite"),
    (dict(scaling=float("inf")), ValueError, "scaling must be finite"),
    (dict(x=torch.randn(4, 0), weight=torch.randn(10, 0), lora_A=torch.randn(3, 0), mask_A=None), ValueError,
     "in_features=0"),
]


@pytest.mark.parametrize("over,exc,msg", CASES, ids=[c[2] for c in CASES])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input(over, exc, msg, backend):
    with lk.backend.use(backend), pytest.raises(exc, match=msg):
        lk.lora_linear(**good(**over))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_mixed_devices():
    with pytest.raises(ValueError, match="lora_A is on"):
        lk.lora_linear(**good(x=torch.randn(4, 12, device="cuda"), weight=torch.randn(10, 12, device="cuda")))


def test_mixed_devices_meta():
    """A device mismatch is caught by validation, before any kernel sees the tensors (meta stands in for a GPU)."""
    with pytest.raises(ValueError, match="weight is on meta"):
        lk.lora_linear(**good(weight=torch.randn(10, 12, device="meta")))


def test_float64_is_refused_by_triton_but_runs_on_auto():
    args = good(**{k: v.double() for k, v in good().items() if isinstance(v, torch.Tensor) and v.is_floating_point()})
    with lk.backend.use("triton"), pytest.raises(RuntimeError, match="float64"):
        lk.lora_linear(**args)
    with lk.backend.use("auto"):
        assert lk.lora_linear(**args).dtype == torch.float64
