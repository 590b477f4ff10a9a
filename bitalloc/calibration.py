"""One calibration pass with forward pre-hooks on named Linear layers, shared by the passes
that only observe inputs (scale folding, unit embeddings)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

InputHook = Callable[[torch.Tensor], None]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def observe_inputs(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    hooks: Mapping[str, InputHook],
    windows: torch.Tensor,
    batch_size: int,
) -> None:
    """Run ``model`` on ``windows`` (batches of ``batch_size``, eval mode, no grad) calling
    ``hooks[name](x)`` with each input ``x`` of ``linears[name]``; hooks are removed and the
    previous mode restored afterwards, also on error."""

    def forward_pre_hook(hook: InputHook):
        def call(_module: nn.Module, args: tuple) -> None:
            if args:
                hook(args[0].detach())

        return call

    handles = [
        linear.register_forward_pre_hook(forward_pre_hook(hooks[name]))
        for name, linear in linears.items()
    ]
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(windows), batch_size):
                batch = windows[start : start + batch_size].to(device)
                model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
