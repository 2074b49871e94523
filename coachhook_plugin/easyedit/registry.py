"""Registering editing methods with EasyEdit: the ONE place that touches EasyEdit's tables.

EasyEdit dispatches on ``hparams.alg_name`` through module-level tables:

* ``easyeditor.util.alg_dict.ALG_DICT`` (``name -> apply_fn``), star-imported by
  ``easyeditor.editors.editor`` (same dict object, so it is mutated in place, never rebound);
* ``BatchEditor.is_batchable_method`` (a hard-coded chain of comparisons, asserted by ``batch_edit``);
* newer EasyEdit only: ``CALLABLE_RESTORE_ALGS`` (methods whose ``weights_copy`` is a restore callable);
* the tokenizer padding side, which ``BaseEditor.__init__`` picks from a hard-coded method list.

:func:`register_method` updates all of them (each only where this EasyEdit has it) and is idempotent.
"""
from __future__ import annotations

import functools
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from . import editor
from .imports import easyeditor_import_error, easyeditor_module, easyeditor_not_installed, import_easyeditor

LOG = logging.getLogger(__name__)

_MISSING = object()


@dataclass
class MethodSpec:
    name: str
    apply_fn: Callable
    hparams_cls: Optional[type]
    batchable: bool
    callable_restore: bool
    padding_side: Optional[str]
    dispatch_fn: Callable  # what ALG_DICT holds (apply_fn behind the restore adapter)


_METHODS: Dict[str, MethodSpec] = {}
_PREVIOUS_ALG: Dict[str, Any] = {}  # ALG_DICT entries we replaced, for unregister_method
_ORIGINAL_IS_BATCHABLE: Dict[type, Any] = {}


class RestoreHandle(dict):
    """EasyEdit's ``weights_copy`` for a method restored by a callable: an *empty dict* that is also callable.

    Every registered method's ``apply_fn`` may return a plain restore callable (hook-based editors such as
    CoachHooK, GRACE, WISE, or a method that keeps its own copy of the weights); the dispatch adapter wraps it in
    this one handle, because the two EasyEdit flavours consume ``weights_copy`` differently:

    * newer EasyEdit (``CALLABLE_RESTORE_ALGS``) calls ``weights_copy()`` when it rolls back;
    * PyPI EasyEdit iterates ``weights_copy.items()`` after *every* edit and copies tensors back. ``.items()``
      therefore restores only when the caller asked to keep the original weights (``keep_original_weight=True``,
      single-round); otherwise repeated calls stay consecutive. As a dict it contributes no tensors.

    The restore function runs at most once; ``bool(handle)`` is True until it has. Whatever the restore function
    raises (e.g. CoachHooK's StaleRestoreError) reaches the caller, and the handle stays unrestored.
    """

    def __init__(self, restore_fn: Callable[[], Any], restore_on_items: bool = False):
        super().__init__()
        self._restore_fn = restore_fn
        self.restore_on_items = bool(restore_on_items)
        self.restored = False

    def __call__(self):
        if self.restored:
            return None
        result = self._restore_fn()
        self.restored = True
        return result

    def items(self):
        if self.restore_on_items:
            self()
        return super().items()

    def __bool__(self):
        return not self.restored

    def __repr__(self):
        return f"RestoreHandle({getattr(self._restore_fn, '__name__', self._restore_fn)!r}, restored={self.restored})"


def _nothing_to_restore():
    return None


def as_weights_copy(restore: Any, callable_restore: bool = False, restore_on_items: bool = False) -> Any:
    """Normalise what an ``apply_fn`` returned as its second value for both EasyEdit flavours.

    A restore callable becomes a :class:`RestoreHandle` (``restore_on_items``: the call asked to keep the original
    weights). ``None`` (nothing to restore) becomes ``{}``, or, for a method listed in newer EasyEdit's
    ``CALLABLE_RESTORE_ALGS`` (which calls ``weights_copy()`` unconditionally), an empty no-op handle.
    A ``{param: tensor}`` dict is EasyEdit's own protocol and passes through."""
    if restore is None:
        return RestoreHandle(_nothing_to_restore) if callable_restore else {}
    if isinstance(restore, dict):
        return restore
    if callable(restore):
        return RestoreHandle(restore, restore_on_items=restore_on_items)
    return restore


#: where EasyEdit's apply contract puts keep_original_weight when it is passed by position
#: (model, tok, requests, hparams, copy, return_orig_weights, keep_original_weight)
_KEEP_ORIGINAL_WEIGHT_POSITION = 6


def _keeps_original_weight(args, kwargs) -> bool:
    if "keep_original_weight" in kwargs:
        return bool(kwargs["keep_original_weight"])
    return bool(args[_KEEP_ORIGINAL_WEIGHT_POSITION]) if len(args) > _KEEP_ORIGINAL_WEIGHT_POSITION else False


def _dispatch_adapter(name: str, apply_fn: Callable) -> Callable:
    @functools.wraps(apply_fn)
    def dispatch(*args, **kwargs):
        result = apply_fn(*args, **kwargs)
        if isinstance(result, tuple) and len(result) == 2:
            model, restore = result
            spec = _METHODS.get(name)
            return model, as_weights_copy(restore, callable_restore=bool(spec and spec.callable_restore),
                                          restore_on_items=_keeps_original_weight(args, kwargs))
        return result

    dispatch.__coachhook_method__ = name
    return dispatch


def _alg_dicts():
    """Every distinct ALG_DICT object EasyEdit's modules reference."""
    seen = []
    for modname in ("easyeditor.util.alg_dict", "easyeditor.editors.editor", "easyeditor.util"):
        mod = sys.modules.get(modname) or easyeditor_module(modname)
        table = getattr(mod, "ALG_DICT", None)
        if isinstance(table, dict) and not any(table is t for t in seen):
            seen.append(table)
    return seen


def _batch_editor_classes():
    out = []
    for modname in ("easyeditor.editors.batch_editor", "easyeditor.editors.editor", "easyeditor.editors"):
        mod = sys.modules.get(modname) or easyeditor_module(modname)
        cls = getattr(mod, "BatchEditor", None)
        if cls is not None and cls not in out and hasattr(cls, "is_batchable_method"):
            out.append(cls)
    return out


def _install_batchable_check() -> None:
    for cls in _batch_editor_classes():
        if cls in _ORIGINAL_IS_BATCHABLE:
            continue
        original = cls.__dict__.get("is_batchable_method")
        original_fn = original.__func__ if isinstance(original, staticmethod) else cls.is_batchable_method

        def is_batchable_method(alg_name: str, _orig=original_fn):
            spec = _METHODS.get(alg_name)
            if spec is not None:
                return spec.batchable
            return _orig(alg_name)

        _ORIGINAL_IS_BATCHABLE[cls] = original
        # Enum classes allow (re)binding non-member attributes
        type.__setattr__(cls, "is_batchable_method", staticmethod(is_batchable_method))


def _callable_restore_tables():
    """(module, attribute) pairs holding a CALLABLE_RESTORE_ALGS collection (newer EasyEdit)."""
    out = []
    for modname in ("easyeditor.editors.utils", "easyeditor.editors.editor", "easyeditor.util.alg_dict"):
        mod = sys.modules.get(modname) or easyeditor_module(modname)
        if mod is not None and hasattr(mod, "CALLABLE_RESTORE_ALGS"):
            out.append(mod)
    return out


def _set_callable_restore(name: str, enabled: bool) -> None:
    for mod in _callable_restore_tables():
        table = mod.CALLABLE_RESTORE_ALGS
        if isinstance(table, set):
            (table.add if enabled else table.discard)(name)
        elif isinstance(table, list):
            if enabled and name not in table:
                table.append(name)
            elif not enabled and name in table:
                table.remove(name)
        else:  # frozenset / tuple: rebind in this module
            items = set(table)
            (items.add if enabled else items.discard)(name)
            mod.CALLABLE_RESTORE_ALGS = type(table)(items) if isinstance(table, (frozenset, tuple)) else items


def register_method(name: str, apply_fn: Callable, hparams_cls: Optional[type] = None, batchable: bool = True,
                    callable_restore: bool = True, padding_side: Optional[str] = None) -> bool:
    """Make ``alg_name == name`` dispatch to ``apply_fn`` in EasyEdit's ``BaseEditor``.

    ``apply_fn(model, tok, requests, hparams, copy=False, return_orig_weights=False,
    keep_original_weight=False, **kwargs) -> (model, weights_copy)`` as for EasyEdit's own methods;
    ``weights_copy`` may be a ``{param: tensor}`` dict, a restore callable (wrapped in a
    :class:`RestoreHandle` so that both EasyEdit flavours can restore it) or None.

    ``batchable``: allowed by ``batch_edit``. ``callable_restore``: listed in newer EasyEdit's
    ``CALLABLE_RESTORE_ALGS``. ``padding_side``: 'left'/'right' forces the tokenizer padding side
    when an editor for this method is built (None: EasyEdit's rule, i.e. left for decoder-only models).

    Idempotent: registering the same name again replaces the entry without stacking wrappers.
    Also installs the plugin's ``BaseEditor`` compatibility patches (:func:`editor.install`).
    Returns True; raises ImportError when easyeditor is not importable.
    """
    if padding_side not in (None, "left", "right"):
        raise ValueError(f"padding_side must be None, 'left' or 'right', not {padding_side!r}")
    import_easyeditor()
    editor.install()
    editor.set_padding_side_lookup(padding_side_for)
    old = _METHODS.get(name)
    if old is not None and old.apply_fn is apply_fn:
        dispatch = old.dispatch_fn
    else:
        dispatch = _dispatch_adapter(name, apply_fn)
    _METHODS[name] = MethodSpec(name, apply_fn, hparams_cls, bool(batchable), bool(callable_restore),
                                padding_side, dispatch)
    for table in _alg_dicts():
        current = table.get(name, _MISSING)
        if name not in _PREVIOUS_ALG and getattr(current, "__coachhook_method__", None) != name:
            _PREVIOUS_ALG[name] = current
        table[name] = dispatch
    _install_batchable_check()
    _set_callable_restore(name, callable_restore)
    LOG.debug("registered EasyEdit method %s -> %s", name, getattr(apply_fn, "__qualname__", apply_fn))
    return True


def unregister_method(name: str) -> None:
    """Undo :func:`register_method` for ``name`` (restores a replaced ALG_DICT entry)."""
    spec = _METHODS.pop(name, None)
    if spec is None:
        return
    previous = _PREVIOUS_ALG.pop(name, _MISSING)
    for table in _alg_dicts():
        if previous is _MISSING:
            table.pop(name, None)
        else:
            table[name] = previous
    _set_callable_restore(name, False)


def easyedit_dispatches(name: str) -> bool:
    """Whether the installed EasyEdit itself dispatches ``name`` (not counting what was registered here)."""
    import_easyeditor()
    for table in _alg_dicts():
        fn = table.get(name)
        if fn is not None and getattr(fn, "__coachhook_method__", None) != name:
            return True
    return False


def is_registered(name: str) -> bool:
    return name in _METHODS and any(t.get(name) is _METHODS[name].dispatch_fn for t in _alg_dicts())


def get_method(name: str) -> Optional[MethodSpec]:
    return _METHODS.get(name)


def hparams_class(name: str) -> Optional[type]:
    spec = _METHODS.get(name)
    return spec.hparams_cls if spec else None


def padding_side_for(alg_name: str) -> Optional[str]:
    spec = _METHODS.get(alg_name)
    return spec.padding_side if spec else None


def registered_methods() -> Dict[str, MethodSpec]:
    return dict(_METHODS)


class RegistrationWarning(UserWarning):
    """CoachHooK could not be registered with an EasyEdit that is installed."""


def warn_registration_failed(exc: BaseException, what: str = "`import easyeditor`") -> None:
    """A visible warning (never silence) that EasyEdit will not know "CoachHooK", with the import error."""
    import warnings

    warnings.warn(
        f"coachhook-plugin: CoachHooK is NOT registered with EasyEdit: {what} failed with "
        f"{type(exc).__name__}: {exc}. Install what it names into this environment (for GitHub EasyEdit: its "
        f"requirements.txt; the README's 'Supported EasyEdit versions' lists what the plugin stands in for), "
        f"then call coachhook_plugin.register() (or start Python again).",
        RegistrationWarning, stacklevel=3)


def register() -> bool:
    """Register CoachHooK with EasyEdit. Safe to call anywhere, any number of times.

    Returns True when ``"CoachHooK"`` is dispatchable by EasyEdit afterwards; False (without raising)
    when easyeditor is not importable or the CoachHooK method modules are not available yet. No EasyEdit
    installed at all stays quiet; an EasyEdit that fails to import is a :class:`RegistrationWarning`
    carrying the import error.
    """
    if not editor.install():
        exc = easyeditor_import_error()
        if exc is None or easyeditor_not_installed(exc):  # no EasyEdit at all: nothing to register with
            LOG.debug("easyeditor is not installed: CoachHooK not registered with EasyEdit")
        else:  # an EasyEdit that fails to import: say so, or the user only finds out when "CoachHooK" is unknown
            warn_registration_failed(exc)
        return False
    try:
        from coachhook_plugin.method import apply_coachhook_to_model
        from coachhook_plugin.hparams import CoachHooKHyperParams
    except ImportError as exc:
        warn_registration_failed(exc, what="the CoachHooK method modules")
        return False
    ok = register_method("CoachHooK", apply_coachhook_to_model, CoachHooKHyperParams, batchable=True,
                         callable_restore=True, padding_side="right")
    return ok
