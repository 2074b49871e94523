"""EasyEdit's ``BaseEditor``, patched once by :func:`install`: any model loaded on CPU with the Auto classes,
the padding side, batch sizes, and every edit / evaluation call inside :func:`editing_context`."""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Dict, Optional

import torch

from .archives import prepare_editing_hparams
from .evaluation import unwrap_public_evaluation, wrap_public_evaluation
from .imports import easyeditor_available, easyeditor_module
from .learned_editors import LEARNED_EDITORS, family_name, reset_executor
from .logs import make_logs_replacement
from .patches import editing_context, ensure_hparams_defaults

LOG = logging.getLogger(__name__)

#: EasyEdit methods that locate subject tokens by position and therefore want right padding
#: (EasyEdit's own rule: every other method gets left padding on decoder-only tokenizers).
RIGHT_PADDING_ALGS = frozenset({"ROME", "MEMIT", "EMMET", "EAMET", "R-ROME", "AlphaEdit", "CORE", "SPHERE"})

#: model-name substrings for which EasyEdit's own loader must be used (remote code, API models)
_EASYEDIT_LOADED_FAMILIES = ("chatglm", "internlm", "baichuan", "gpt-3.5", "qwen-api", "-api")



def load_model_and_tokenizer(name_or_path: str, hparams: Any = None, **model_kwargs):
    """The package's loader (`models.load_model_and_tokenizer`) with what an EasyEdit hparams file asks for:
    `model_parallel` → device_map "auto", `fp16` → float16."""
    from ..models import load_model_and_tokenizer as load

    dtype = torch.float16 if getattr(hparams, "fp16", False) else model_kwargs.pop("dtype", torch.float32)
    if getattr(hparams, "model_parallel", False):
        model_kwargs.setdefault("device_map", "auto")
    return load(name_or_path, dtype=dtype, **model_kwargs)


def model_display_name(model) -> str:
    """A string EasyEdit can use as ``model_name`` (it calls ``.lower()`` and looks for 't5', 'llama')."""
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", "") or getattr(cfg, "model_type", "") or type(model).__name__
    name = str(name)
    if "t5" in name.lower() and not getattr(cfg, "is_encoder_decoder", False):
        name = getattr(cfg, "model_type", None) or type(model).__name__
    return name


def _no_padding_side(alg_name: str) -> Optional[str]:
    return None


# Who decides a registered method's padding side: the registry hands its lookup in (set_padding_side_lookup), so
# this module never imports the registry (the registry imports this one to install the editor patches).
_padding_side_lookup: Callable[[str], Optional[str]] = _no_padding_side


def set_padding_side_lookup(lookup: Optional[Callable[[str], Optional[str]]]) -> None:
    """``lookup(alg_name)`` -> 'left' / 'right' for a method that forces its padding side, None for EasyEdit's rule.
    ``None`` resets to EasyEdit's rule for every method."""
    global _padding_side_lookup
    _padding_side_lookup = lookup or _no_padding_side


def apply_padding_side(tok, alg_name: str, model=None) -> None:
    """EasyEdit's padding rule, extended by the registry: right for locate-by-position methods
    (ROME, MEMIT, ... and registered methods that ask for it), left for the other methods, on
    decoder-only models."""
    if tok is None or getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return
    side = _padding_side_lookup(alg_name)
    if side is None:
        side = "right" if alg_name in RIGHT_PADDING_ALGS else "left"
    tok.padding_side = side


def _should_use_own_loader(name: str) -> bool:
    low = name.lower()
    return not any(fam in low for fam in _EASYEDIT_LOADED_FAMILIES)


def _patched_editor_init(orig_init, editor_module):
    @functools.wraps(orig_init)
    def __init__(self, hparams, *args, **kwargs):
        if hparams is None:
            return orig_init(self, hparams, *args, **kwargs)
        ensure_hparams_defaults(hparams)
        learned = getattr(hparams, "alg_name", None) in LEARNED_EDITORS
        if learned:  # the archive exists (else one sentence naming `coachhook train`), local model names
            prepare_editing_hparams(hparams)
        name = hparams.model_name
        loaded_here = False
        if isinstance(name, str) and _should_use_own_loader(name):
            model, tok = load_model_and_tokenizer(name, hparams)
            display, loaded_here = name, True
        elif isinstance(name, (tuple, list)) and len(name) == 2:
            model, tok = name
            display = model_display_name(model)
        else:
            model = tok = None
        if learned and model is not None:
            # EasyEdit's MEND/SERAC pick the architecture by substrings of model_name / model.name_or_path
            display = family_name(display, getattr(model.config, "model_type", None))
            model.name_or_path = display
        real_make_logs = getattr(editor_module, "make_logs", None)
        if real_make_logs is not None:
            editor_module.make_logs = make_logs_replacement(editor_module)
        try:
            with editing_context():
                if model is None:
                    return orig_init(self, hparams, *args, **kwargs)
                hparams.model_name = (model, tok)
                try:
                    orig_init(self, hparams, *args, **kwargs)
                finally:
                    # evaluation calls model_name.lower(); LoRA calls hparams.model_name.lower()
                    hparams.model_name = display
                self.model_name = display
                if learned:  # EasyEdit's executor is a process-wide singleton holding the previous editor's model
                    reset_executor(getattr(self, "apply_algo", None))
                if loaded_here:
                    apply_padding_side(self.tok, hparams.alg_name, self.model)
                else:
                    side = _padding_side_lookup(hparams.alg_name)
                    if side is not None and self.tok is not None:
                        self.tok.padding_side = side
        finally:
            if real_make_logs is not None:
                editor_module.make_logs = real_make_logs

    __init__.__coachhook_patch__ = True
    return __init__


def _scoped_method(orig):
    @functools.wraps(orig)
    def method(self, *args, **kwargs):
        with editing_context():
            return orig(self, *args, **kwargs)

    method.__coachhook_patch__ = True
    return method


def _patched_edit(orig):
    """``edit`` in :func:`editing_context`, and the editor's ``hparams.batch_size`` as it was afterwards: PyPI
    EasyEdit's ``edit`` sets it to 1 for good ("singleton editing"), so a later ``batch_edit`` on the same editor
    silently edited one record per batch."""
    @functools.wraps(orig)
    def edit(self, *args, **kwargs):
        hparams = getattr(self, "hparams", None)
        batch_size = getattr(hparams, "batch_size", None)
        try:
            with editing_context():
                return orig(self, *args, **kwargs)
        finally:
            if batch_size is not None:
                hparams.batch_size = batch_size

    edit.__coachhook_patch__ = True
    return edit


#: BaseEditor methods that hand the method one request per call (``[request]``) in every EasyEdit. GitHub
#: EasyEdit asserts ``hparams.batch_size == 1`` in them, PyPI EasyEdit sets it to 1 for good; the shipped
#: hparams carry the batch size ``batch_edit`` uses (CoachHooK: 10).
ONE_REQUEST_PER_CALL_METHODS = ("edit", "edit_requests", "generate_edit")


def _one_request_per_call(orig):
    """While ``orig`` runs, the editor's ``hparams.batch_size`` reads 1 (what these methods do anyway: one
    request per call), so GitHub EasyEdit's "Single Editing: batch_size should be set to 1" assertion holds
    with the shipped hparams; the user's value is put back afterwards, also on error. Nested calls
    (``edit`` -> ``edit_requests``) are handled by the outermost one."""
    @functools.wraps(orig)
    def method(self, *args, **kwargs):
        hparams = getattr(self, "hparams", None)
        batch_size = getattr(hparams, "batch_size", None)
        if batch_size is None or batch_size == 1:
            return orig(self, *args, **kwargs)
        hparams.batch_size = 1
        try:
            return orig(self, *args, **kwargs)
        finally:
            hparams.batch_size = batch_size

    method.__coachhook_patch__ = True
    return method


#: BaseEditor methods that run EasyEdit editing / evaluation code (whichever exist)
EDITOR_METHODS = ("edit", "batch_edit", "edit_dataset", "edit_requests", "sequential_edit",
                  "normal_edit", "generate_edit")
_installed: Dict[str, Any] = {}


def install() -> bool:
    """Patch EasyEdit's ``BaseEditor`` (once; idempotent) so that it loads any model on CPU and runs
    every edit / evaluation call inside :func:`editing_context`. Returns False if easyeditor is not
    importable. Undo with :func:`uninstall`."""
    if _installed:
        return True
    if not easyeditor_available():
        return False
    editor_module = easyeditor_module("easyeditor.editors.editor")
    base = getattr(editor_module, "BaseEditor", None)
    if base is None:
        return False
    init = base.__dict__.get("__init__")
    if init is not None and not getattr(init, "__coachhook_patch__", False):
        _installed["__init__"] = init
        base.__init__ = _patched_editor_init(init, editor_module)
    for name in EDITOR_METHODS:
        fn = base.__dict__.get(name)
        if callable(fn) and not getattr(fn, "__coachhook_patch__", False):
            _installed[name] = fn
            patched = _patched_edit(fn) if name == "edit" else _scoped_method(fn)
            if name in ONE_REQUEST_PER_CALL_METHODS:
                patched = _one_request_per_call(patched)
            setattr(base, name, patched)
    _installed["__class__"] = base
    wrap_public_evaluation()
    return True


def uninstall() -> None:
    """Undo :func:`install`."""
    base = _installed.pop("__class__", None)
    for name, fn in list(_installed.items()):
        if base is not None:
            setattr(base, name, fn)
    _installed.clear()
    unwrap_public_evaluation()


def make_editor(hparams, model=None, tok=None):
    """Build an EasyEdit ``BaseEditor`` for ``hparams`` on whatever device is available.

    * ``model=None``: ``hparams.model_name`` (any HF id or local path) is loaded with the Auto classes;
    * ``model`` given: that model (and ``tok``, loaded from ``hparams.model_name`` /
      ``model.config._name_or_path`` if omitted) is used as is.

    ``hparams.model_name`` / ``editor.model_name`` end up as a *string* in both cases (EasyEdit's
    evaluation calls ``model_name.lower()``).
    """
    if not install():
        raise ImportError("easyeditor is not importable; install it (pip install --no-deps easyeditor)")
    from easyeditor.editors.editor import BaseEditor

    if model is not None:
        if tok is None:
            from transformers import AutoTokenizer

            src = hparams.model_name if isinstance(hparams.model_name, str) else model.config._name_or_path
            tok = AutoTokenizer.from_pretrained(src)
            if tok.pad_token_id is None and tok.eos_token_id is not None:
                tok.pad_token_id = tok.eos_token_id
        hparams.model_name = (model, tok)
    return BaseEditor(hparams)
