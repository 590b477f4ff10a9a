"""A model's structure without its weights: the causal LM of a config built on PyTorch's
``meta`` device, which gives every unit's name and shape at no memory cost."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bitalloc.errors import BitallocError


def meta_skeleton(config: Any) -> nn.Module:
    """The causal LM of a transformers ``config`` built on the ``meta`` device (no memory),
    checked to be a Llama-family layout (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    skeleton.eval()
    inner = getattr(skeleton, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    absent = [a for a in needed if inner is None or not hasattr(inner, a)]
    if absent or not hasattr(skeleton, "lm_head"):
        raise BitallocError(
            f"{type(skeleton).__name__} is not a Llama-family layout (no "
            f"{', '.join(f'model.{a}' for a in absent) or 'lm_head'}); streaming supports "
            "models with model.embed_tokens, model.layers, model.norm, model.rotary_emb "
            "and lm_head; load smaller models whole instead"
        )
    return skeleton
