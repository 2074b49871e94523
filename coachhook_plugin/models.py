"""Architecture facts the method needs, decided by module types and config, never by name strings.

A down-projection is either a `torch.nn.Linear` (GPT-J `fc_out`, Llama `down_proj`: weight is (out, in))
or a GPT-2 `Conv1D` (`c_proj`: weight stored transposed, (in, out)). Everything in this package works
with weights in (out, in) orientation; `weight_out_in` is the one place that knows the difference.
"""
from __future__ import annotations

from typing import Tuple

import torch


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise LookupError(f"module {name!r} not found in {type(model).__name__}") from e


def is_conv1d(module: torch.nn.Module) -> bool:
    # transformers' Conv1D: y = x @ W + b with W of shape (in, out); identified by type name and `nf`
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def weight_out_in(module: torch.nn.Module) -> torch.Tensor:
    """The down-projection's weight as an (out, in) view, whatever its storage orientation."""
    if is_conv1d(module):
        return module.weight.t()
    if isinstance(module, torch.nn.Linear):
        return module.weight
    raise TypeError(f"{type(module).__name__} is not a hook-able down-projection (need nn.Linear or "
                    f"transformers Conv1D); point rewrite_module_tmp at the FFN's output projection")


def down_proj_shape(module: torch.nn.Module) -> Tuple[int, int]:
    """(d_out, d_in) of a down-projection."""
    w = weight_out_in(module)
    return int(w.shape[0]), int(w.shape[1])


def num_layers(model: torch.nn.Module) -> int:
    cfg = model.config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(cfg, attr, None) is not None:
            return int(getattr(cfg, attr))
    raise ValueError(f"cannot tell the number of layers of {type(model).__name__} from its config")


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_name_for_stats(model: torch.nn.Module) -> str:
    """The directory name EasyEdit uses for this model's statistics files."""
    return str(getattr(model.config, "_name_or_path", "") or type(model).__name__).replace("/", "_")
