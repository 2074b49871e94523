"""EasyEdit results as plain Python, and undoing an edit from the ``weights_copy`` a method returned."""
from __future__ import annotations

import contextlib
from dataclasses import asdict, is_dataclass
from pathlib import PurePath
from typing import Any

import torch

from .imports import easyeditor_module


# --------------------------------------------------------------------------------------------------
# 7. results and weights
# --------------------------------------------------------------------------------------------------


def to_builtin(obj: Any) -> Any:
    """Recursively convert EasyEdit results (numpy scalars/arrays, tensors, tuples, dataclasses,
    paths) to plain ``json``-serialisable Python values. Dict keys become strings when they are not
    str/int/float/bool/None."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if np is not None:
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return to_builtin(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return to_builtin(obj.detach().cpu().tolist())
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            k = to_builtin(k)
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                k = str(k)
            out[k] = to_builtin(v)
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_builtin(v) for v in obj]
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_builtin(asdict(obj))
    if isinstance(obj, (PurePath, torch.device, torch.dtype)):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        with contextlib.suppress(Exception):
            return to_builtin(obj.item())
    return str(obj)


def unwrap_edited_model(model, edited):
    """The model to keep editing after ``edited, weights_copy = apply_algo(model, ...)``.

    Newer EasyEdit's GRACE returns its editor wrapper (an ``nn.Module`` holding the model as ``.model``,
    which it edited in place: the adapter is inside ``model``); keeping the wrapper would make the next call
    look for ``transformer`` inside the wrapper. Every other method returns the model (or a PEFT model)."""
    inner = getattr(edited, "model", None) if edited is not model else None
    if isinstance(edited, torch.nn.Module) and inner is model:
        return model
    return edited


def restore_weights(model, weights_copy) -> None:
    """Undo an edit from what an EasyEdit ``apply_*_to_model`` returned as ``weights_copy``:
    a ``{param_name: original_tensor}`` dict (copied back onto each parameter's own device), a
    callable (GRACE/WISE/KN-style restore function; called) or None/empty (nothing to do)."""
    if weights_copy is None:
        return
    if callable(weights_copy):  # a restore function, or the registry's RestoreHandle (an empty dict)
        owner = getattr(weights_copy, "__self__", None)
        if getattr(weights_copy, "__name__", "") == "reset_layer" and owner is not None and \
                hasattr(owner, "original_layer") and owner.original_layer is None:
            # newer EasyEdit's GRACE: this call found GRACE's adapter already in the model (an earlier call of the
            # same batch put it there) and kept no original layer; its reset_layer would put None into the model.
            # The earliest call's handle restores the layer.
            return
        weights_copy()
        return
    if isinstance(weights_copy, dict):
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights_copy.items():
                p = params.get(name)
                if p is None:
                    nethook = easyeditor_module("easyeditor.util.nethook")
                    p = nethook.get_parameter(model, name)
                p[...] = value.to(device=p.device, dtype=p.dtype)
        return
    raise TypeError(f"cannot restore from {type(weights_copy).__name__}")
