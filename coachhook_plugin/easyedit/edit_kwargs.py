"""Which EasyEdit calls write a whole batch, and the keyword arguments that make ``edit`` / ``batch_edit``
consecutive or single-round in whichever EasyEdit is installed."""
from __future__ import annotations

import inspect
from typing import Callable, Dict


from .editor import install
from .imports import easyeditor_module


# Batchable in GitHub EasyEdit's ``BatchEditor`` (LoRA, QLoRA, PMET, EMMET) but not in PyPI's older list,
# plus AlphaEdit (MEMIT's request loop, whatever the list says); their apply functions write every request
# of a list in both flavours. GRACE/WISE are left to ``BatchEditor`` (one request per call unless it says so).
_BATCHABLE_SINCE_PYPI = frozenset({"LoRA", "QLoRA", "PMET", "EMMET", "AlphaEdit"})


def is_batchable(alg_name: str) -> bool:
    """Whether EasyEdit's ``apply_<alg>_to_model`` writes every request it is given.

    ROME and KN read ``requests[0]`` only (EasyEdit's ``edit`` calls them once per request; its
    ``batch_edit`` refuses them): passing them a batch silently drops all but its first edit.
    """
    if alg_name in _BATCHABLE_SINCE_PYPI:
        return True
    install()  # the registry's own methods answer through the patched is_batchable_method
    mod = easyeditor_module("easyeditor.editors.batch_editor")
    cls = getattr(mod, "BatchEditor", None)
    if cls is None:
        return alg_name not in ("ROME", "KN", "R-ROME")
    return bool(cls.is_batchable_method(alg_name))




def _editor_parameter(method: str, name: str) -> bool:
    """Whether this EasyEdit's ``BaseEditor.<method>`` declares the parameter ``name`` (not via ``**kwargs``)."""
    editor_module = easyeditor_module("easyeditor.editors.editor")
    fn = getattr(getattr(editor_module, "BaseEditor", None), method, None)
    if fn is None:
        return False
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def consecutive_edit_kwargs(method: str = "batch_edit") -> Dict[str, bool]:
    """Keyword arguments that make ``BaseEditor.edit`` / ``batch_edit`` *keep* each call's edit, so that
    repeated calls accumulate (consecutive editing), in whichever EasyEdit is installed.

    Newer EasyEdit rolls every call back unless ``sequential_edit=True``; PyPI EasyEdit keeps edits unless
    ``keep_original_weight=True``. Use as ``editor.batch_edit(..., **consecutive_edit_kwargs())``."""
    if _editor_parameter(method, "sequential_edit"):
        return {"sequential_edit": True}
    return {"keep_original_weight": False}


def single_round_edit_kwargs(method: str = "batch_edit") -> Dict[str, bool]:
    """Keyword arguments that make ``edit`` / ``batch_edit`` roll each call back after its evaluation
    (single-round editing): ``sequential_edit=False`` (newer EasyEdit), ``keep_original_weight=True`` (PyPI)."""
    if _editor_parameter(method, "sequential_edit"):
        return {"sequential_edit": False}
    return {"keep_original_weight": True}


def accepts_kwarg(fn: Callable, name: str) -> bool:
    """Whether ``fn`` accepts keyword ``name`` (directly or through ``**kwargs``)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    return name in sig.parameters or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
