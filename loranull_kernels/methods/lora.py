"""LoRA (Hu et al.): A kaiming-uniform(a=√5) exactly as PEFT, B = 0; the base is untouched."""
import math

import torch

from .base import AdapterInit, Method


def initialize(weight, r, scaling, config, covariance=None, generator=None) -> AdapterInit:
    out_f, in_f = weight.shape
    A = torch.empty(r, in_f, dtype=weight.dtype, device=weight.device)
    # kaiming_uniform_(a=√5) on an (r, in) tensor: U(−b, b) with b = gain·√(3/fan_in), gain = √(2/(1+a²)).
    bound = math.sqrt(2.0 / 6.0) * math.sqrt(3.0 / in_f)
    A.uniform_(-bound, bound, generator=generator)  # generator None: torch's global generator, as PEFT
    B = torch.zeros(out_f, r, dtype=weight.dtype, device=weight.device)
    return AdapterInit(lora_A=A, lora_B=B, weight=weight)


METHOD = Method("lora", initialize)
