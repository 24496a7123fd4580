"""The one dtype rule of the package's decompositions (SVDs, eigendecompositions, merges, penalties)."""
import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 tensors, float32 for every other dtype: decompositions never run in half precision (the
    small singular values and the null space live below its resolution), and float64 models keep float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32
