"""Importing ``easyeditor`` where its multimodal-only code cannot be imported (the import guard), and
finding its submodules. Every other module of this package reaches EasyEdit through here."""
from __future__ import annotations

import importlib
import importlib.abc
import logging
import re
import sys
import threading
import types
from typing import Dict, Optional, Tuple


LOG = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# 1. importing easyeditor
# --------------------------------------------------------------------------------------------------

#: third-party modules that only EasyEdit's *multimodal* code (BLIP-2 / MiniGPT-4 trainers, image
#: processors) imports at import time, with what needs them (used in error messages).
MULTIMODAL_ONLY_MODULES: Dict[str, str] = {
    "timm": "the BLIP-2 / MiniGPT-4 vision towers (easyeditor.trainer.blip2_models)",
    "torchvision": "the BLIP image processors and BLIP-2 download helpers",
    "cv2": "RandAugment in the BLIP image processors (easyeditor.dataset.processor.randaugment)",
    "iopath": "the BLIP-2 checkpoint download / file helpers",
    "fairscale": "activation checkpointing in the CLIP vision tower (easyeditor.trainer.blip2_models.clip_vit)",
}

#: EasyEdit submodules that belong to its multimodal (image) editing: only these may be stood in for.
MULTIMODAL_MODULE_PREFIXES = ("easyeditor.trainer.blip2_models", "easyeditor.dataset.processor")
_MULTIMODAL_SEGMENT = re.compile(r"(blip|minigpt|llava|qwen_?vl|multimodal|vision|image|processor)", re.I)
#: EasyEdit modules wrapping hosted-model APIs (``ft_api``, ``deepedit_api``: OpenAI / ZhipuAI clients)
_API_SEGMENT = re.compile(r"(^|_)api($|_)", re.I)


def is_multimodal_module(fullname: str) -> bool:
    """Is ``fullname`` part of EasyEdit's optional code that local text editing never runs: its
    multimodal (image) modules, and (newer EasyEdit) its hosted-API methods such as ``deepedit_api``?"""
    if not fullname.startswith("easyeditor."):
        return False
    if any(fullname == p or fullname.startswith(p + ".") for p in MULTIMODAL_MODULE_PREFIXES):
        return True
    return any(_MULTIMODAL_SEGMENT.search(seg) or _API_SEGMENT.search(seg) for seg in fullname.split(".")[1:])


class MissingMultimodalDependency(ImportError):
    """Raised when code actually uses something from an EasyEdit multimodal module the plugin stood in for."""


def _describe_import_failure(exc: BaseException) -> Tuple[str, str]:
    """(what is needed, why it is missing) for an exception raised while importing a module."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        root = exc.name.partition(".")[0]
        return repr(root), "it is not installed"
    m = re.search(r"cannot import name '([^']+)' from '([^']+)'", str(exc))
    if m:
        return f"{m.group(2)}.{m.group(1)}", f"the installed {m.group(2).partition('.')[0]} no longer provides it"
    if isinstance(exc, MissingMultimodalDependency):
        return getattr(exc, "needs", "a multimodal dependency"), getattr(exc, "why", str(exc))
    if isinstance(exc, ImportError) and exc.name:
        return repr(exc.name), f"it does not import here ({exc})"
    return "their third-party dependencies", f"importing them fails here ({type(exc).__name__}: {exc})"


def _stand_in_message(needs: str, path: str, why: str) -> str:
    root = needs.strip("'").partition(".")[0]
    used_by = MULTIMODAL_ONLY_MODULES.get(root)
    where = f"; it is used by {used_by}" if used_by else ""
    return (f"multimodal EasyEdit features need {needs} (tried to use {path}{where}); coachhook-plugin "
            f"stands in for EasyEdit's multimodal modules because {why}, and text-only editing never "
            f"uses them. Install a working {root!r} (and a matching EasyEdit) to use this feature.")


class _StandIn:
    """A placeholder for a name from a stood-in module: importable, but unusable.

    ``from .blip2_models import Blip2OPT`` must succeed at import time, so attribute access returns
    further placeholders; *using* one (calling, subclassing, iterating, entering, truth-testing...)
    raises :class:`MissingMultimodalDependency` with an explanation.
    """

    __slots__ = ("_path", "_needs", "_why")

    def __init__(self, path: str, needs: str, why: str):
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_needs", needs)
        object.__setattr__(self, "_why", why)

    def _fail(self, *_a, **_k):
        err = MissingMultimodalDependency(_stand_in_message(self._needs, self._path, self._why))
        err.needs, err.why = self._needs, self._why
        raise err

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _StandIn(f"{self._path}.{name}", self._needs, self._why)

    __call__ = _fail
    __iter__ = _fail
    __enter__ = _fail
    __bool__ = _fail
    __getitem__ = _fail
    __mro_entries__ = _fail

    def __setattr__(self, name, value):
        self._fail()

    def __repr__(self):
        return f"<coachhook-plugin stand-in for {self._path}>"


def _turn_into_stand_in(module: types.ModuleType, exc: BaseException) -> None:
    """Keep what the module defined before failing; every other attribute becomes a placeholder."""
    needs, why = _describe_import_failure(exc)
    name = module.__name__

    def __getattr__(attr):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return _StandIn(f"{name}.{attr}", needs, why)

    module.__getattr__ = __getattr__
    module.__coachhook_stand_in__ = {"needs": needs, "why": why, "error": f"{type(exc).__name__}: {exc}"}
    STOOD_IN[name] = module.__coachhook_stand_in__


class _GuardedLoader(importlib.abc.Loader):
    """Runs the real loader; if a multimodal module fails to execute, keeps it as a stand-in."""

    def __init__(self, real):
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        try:
            self.real.exec_module(module)
        except Exception as exc:  # ImportError, or e.g. RuntimeError from a torchvision built for another torch
            if not is_multimodal_module(module.__name__):
                raise
            _turn_into_stand_in(module, exc)

    def __getattr__(self, name):  # get_resource_reader, get_source, ... of the real loader
        return getattr(self.real, name)


class _EasyEditImportGuard(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path`` while ``easyeditor`` is imported; finds ``easyeditor.*`` modules
    with the normal machinery and guards the multimodal ones with :class:`_GuardedLoader`."""

    def find_spec(self, fullname, path=None, target=None):
        if not is_multimodal_module(fullname):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and not isinstance(spec.loader, _GuardedLoader):
                    spec.loader = _GuardedLoader(spec.loader)
                return spec
        return None


#: EasyEdit modules the plugin stood in for, with what they needed (filled by import_easyeditor)
STOOD_IN: Dict[str, Dict[str, str]] = {}
_IMPORT_LOCK = threading.RLock()


def import_easyeditor():
    """Import and return ``easyeditor`` even where its multimodal-only code cannot be imported.

    PyPI ``easyeditor`` imports its BLIP-2 / MiniGPT-4 code eagerly from ``import easyeditor``; that
    code needs timm, torchvision, cv2, iopath and fairscale (PyPI torchvision does not even import
    next to a CPU-only torch) and transformers-4-only helpers (``apply_chunking_to_forward`` ...).

    While ``easyeditor`` is being imported, a guard on ``sys.meta_path`` watches EasyEdit's multimodal
    submodules only (:func:`is_multimodal_module`). One that fails to import is kept as a *stand-in*:
    what it defined before failing stays, every other name is a placeholder that raises
    :class:`MissingMultimodalDependency` (an ``ImportError`` saying what is missing and why) when
    used. No third-party module is ever shadowed or faked, so e.g. transformers' availability checks
    still tell the truth, and an installed, working timm/torchvision is simply used. Text-editing
    modules that fail still raise. The guard is removed afterwards; :data:`STOOD_IN` records what was
    stood in for.
    """
    with _IMPORT_LOCK:
        if easyeditor_is_imported():
            return sys.modules["easyeditor"]
        guard = _EasyEditImportGuard()
        sys.meta_path.insert(0, guard)
        ok = False
        try:
            module = importlib.import_module("easyeditor")
            ok = True
        finally:
            sys.meta_path.remove(guard)
            if not ok:  # do not leave a half-imported easyeditor behind
                for name in list(sys.modules):
                    if name == "easyeditor" or name.startswith("easyeditor."):
                        del sys.modules[name]
        if STOOD_IN:
            LOG.debug("easyeditor imported; stood in for %s", ", ".join(sorted(STOOD_IN)))
        return module


def easyeditor_is_imported() -> bool:
    """Whether ``easyeditor`` is imported completely (not merely being imported)."""
    module = sys.modules.get("easyeditor")
    return module is not None and hasattr(module, "BaseEditor")


_import_failure: Dict[str, BaseException] = {}  # the last failed `import easyeditor`, for registration warnings


def easyeditor_available() -> bool:
    try:
        import_easyeditor()
        _import_failure.clear()
        return True
    except Exception as exc:  # not installed, or broken beyond what we fix
        LOG.debug("easyeditor is not importable: %s", exc)
        _import_failure["error"] = exc
        return False


def easyeditor_import_error() -> Optional[BaseException]:
    """Why the last attempt to import ``easyeditor`` failed (None if it did not fail)."""
    return _import_failure.get("error")


def easyeditor_not_installed(exc: Optional[BaseException]) -> bool:
    """Is ``exc`` "there is no easyeditor at all" (as opposed to an easyeditor that fails to import)?"""
    return isinstance(exc, ModuleNotFoundError) and exc.name == "easyeditor"


def easyeditor_module(name: str):
    """An ``easyeditor`` submodule, or None when this EasyEdit has no such module."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None
