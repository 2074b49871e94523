"""EasyEdit's public evaluation functions (``compute_edit_quality`` ...) run inside :func:`editing_context`."""
from __future__ import annotations

import functools
import sys
from typing import Callable, Dict, Tuple


from .patches import editing_context


#: EasyEdit's public evaluation functions: user code calls them after editing with ``hparams.device`` (an int, or
#: "cpu" in GitHub EasyEdit's hparams), and they build ``f"cuda:{device}"`` themselves.
PUBLIC_EVALUATION_FUNCTIONS = ("compute_edit_quality", "compute_rewrite_or_rephrase_quality",
                               "compute_locality_quality", "compute_portability_quality",
                               "compute_icl_edit_quality")
_wrapped_evaluation: Dict[int, Tuple[Callable, Callable]] = {}  # id(original) -> (original, wrapper)


def _scoped_function(orig):
    @functools.wraps(orig)
    def function(*args, **kwargs):
        with editing_context():
            return orig(*args, **kwargs)

    function.__coachhook_patch__ = True
    return function


def _easyeditor_modules():
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "easyeditor" or name.startswith("easyeditor."))]


def wrap_public_evaluation() -> None:
    """Run EasyEdit's public evaluation functions inside :func:`editing_context`, in every EasyEdit module that
    holds them (``from .evaluate import *`` copies the reference into ``easyeditor``, ``easyeditor.evaluate`` and
    the editor module), so ``compute_edit_quality(..., hparams.device)`` works on a machine without a GPU."""
    for module in _easyeditor_modules():
        for name in PUBLIC_EVALUATION_FUNCTIONS:
            fn = module.__dict__.get(name)
            if not callable(fn) or getattr(fn, "__coachhook_patch__", False):
                continue
            if id(fn) not in _wrapped_evaluation:
                _wrapped_evaluation[id(fn)] = (fn, _scoped_function(fn))
            setattr(module, name, _wrapped_evaluation[id(fn)][1])


def unwrap_public_evaluation() -> None:
    wrappers = {id(w): orig for orig, w in _wrapped_evaluation.values()}
    for module in _easyeditor_modules():
        for name in PUBLIC_EVALUATION_FUNCTIONS:
            fn = module.__dict__.get(name)
            if id(fn) in wrappers:
                setattr(module, name, wrappers[id(fn)])
    _wrapped_evaluation.clear()
