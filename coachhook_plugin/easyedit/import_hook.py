"""Run a callback (registering CoachHooK) when ``easyeditor`` is imported, not before: ``import coachhook_plugin``
stays fast (importing EasyEdit takes seconds) and EasyEdit still knows "CoachHooK" before any ``BaseEditor`` exists.

:func:`when_easyeditor_imported` calls the callback at once when ``easyeditor`` is already imported, else puts
:class:`_EasyEditImportHook` on ``sys.meta_path``. When ``easyeditor`` is first imported, by anyone, the hook steps
aside, puts the multimodal import guard (:mod:`.imports`) in front for the duration (so ``import easyeditor``
after the plugin works where its multimodal-only code cannot be imported, exactly as :func:`import_easyeditor`
does), lets the normal machinery load ``easyeditor``, and then runs the callbacks.
"""
from __future__ import annotations

import importlib.abc
import sys
import threading
from typing import Callable, List

from .imports import _EasyEditImportGuard, easyeditor_is_imported

_LOCK = threading.RLock()
_CALLBACKS: List[Callable[[], None]] = []


def _forget_half_imported_easyeditor() -> None:
    for name in list(sys.modules):
        if name == "easyeditor" or name.startswith("easyeditor."):
            del sys.modules[name]


def _run_callbacks() -> None:
    with _LOCK:
        callbacks = list(_CALLBACKS)
        _CALLBACKS.clear()
    for callback in callbacks:
        callback()  # each callback reports its own failures (registration warns, never raises)


class _CallbacksAfterExec(importlib.abc.Loader):
    """``easyeditor``'s own loader, then the guard off and the callbacks run (the module complete by then)."""

    def __init__(self, loader, guard):
        self._loader, self._guard = loader, guard

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        ok = False
        try:
            self._loader.exec_module(module)
            ok = True
        finally:
            if self._guard in sys.meta_path:
                sys.meta_path.remove(self._guard)
            module.__loader__ = self._loader  # the module as if loaded normally (reload, resources)
            if getattr(module, "__spec__", None) is not None:
                module.__spec__.loader = self._loader
            if not ok:  # as import_easyeditor: no half-imported easyeditor left behind; the error propagates
                _forget_half_imported_easyeditor()
        _run_callbacks()


class _EasyEditImportHook(importlib.abc.MetaPathFinder):
    """On ``sys.meta_path`` until ``easyeditor`` is imported; reacts to that one name only."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "easyeditor":
            return None
        guard = None
        if not any(isinstance(f, _EasyEditImportGuard) for f in sys.meta_path):  # import_easyeditor has its own
            guard = _EasyEditImportGuard()
            sys.meta_path.insert(0, guard)
        spec = None
        for finder in list(sys.meta_path):
            if finder is self or isinstance(finder, _EasyEditImportGuard) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None:  # not installed (yet): stay, say nothing
            if guard is not None:
                sys.meta_path.remove(guard)
            return spec
        _uninstall_hook()
        spec.loader = _CallbacksAfterExec(spec.loader, guard)
        return spec


_HOOK = _EasyEditImportHook()


def _uninstall_hook() -> None:
    with _LOCK:
        if _HOOK in sys.meta_path:
            sys.meta_path.remove(_HOOK)


def when_easyeditor_imported(callback: Callable[[], None]) -> None:
    """``callback()`` now if ``easyeditor`` is imported, else right after it is (once; idempotent per callback)."""
    with _LOCK:
        if easyeditor_is_imported():
            run_now = True
        else:
            run_now = False
            if callback not in _CALLBACKS:
                _CALLBACKS.append(callback)
            if _HOOK not in sys.meta_path:
                sys.meta_path.insert(0, _HOOK)
    if run_now:
        callback()
