"""Scoped fixes for EasyEdit's learned editors, MEND and SERAC: their trainer (``EditTrainer``) and their editing
executors (``MendRewriteExecutor`` / ``SeracRewriteExecutor``), on CPU, transformers 5 and both EasyEdits.

What each fix is for (every one detected by feature, active only inside its context, put back afterwards):

* **Architecture by name.** EasyEdit's MEND picks the decoder-only forward (``input_ids``/``attention_mask`` only)
  and the weight orientation of its update by substrings of ``model_name`` ('gpt2', 'llama', ...), SERAC by
  substrings of ``model.name_or_path``; any other name (``smollm2-135m``, a cache folder) falls through to a
  seq2seq path that crashes. :func:`family_name` appends the architecture (``config.model_type``) to such a name
  (``smollm2-135m (llama)``); the trainer loads the model from the real path (:func:`trainer_model_loading`).
* **higher + transformers 5.** PyPI EasyEdit's MEND makes the *whole* model functional with ``higher``; transformers-5
  Llama slices its layer list (``self.layers[:n]``), and slicing a ``higher``-patched ``ModuleList`` fails
  (``MonkeyPatched.__init__() missing ... 'root'``). :func:`functional_modulelist_slicing` hands back a plain
  ``ModuleList`` of the (still patched) layers for a slice of a patched one.
* **torch >= 2.6 ``weights_only``.** EasyEdit's trainer reloads its own archive, and its executors load
  ``hparams.archive``, with ``torch.load`` (PyPI: no ``weights_only``); archives hold a transformers config
  object, which the default ``weights_only=True`` refuses. :func:`trusted_archive_loading` allows full unpickling
  for exactly the files named (the run's own archive, the archive the user's hparams name), nothing else.
* **Editing in training mode.** PyPI's ``MendRewriteExecutor`` never calls ``eval()`` on the editor it builds from
  the archive: MEND's gradient normaliser, in training mode, replaces the trained statistics by the first edit's
  (and raises "Can't perform normalization with only 1 samples" for a one-token target). The executor's
  ``init_model`` is followed by ``eval()`` (GitHub EasyEdit calls it itself).
* **One executor per process.** EasyEdit's MEND/SERAC executors are singletons that keep the first editor's model
  and archive; :func:`reset_executor` makes each new ``BaseEditor`` initialise its own.
* **Target tokens without their space.** PyPI EasyEdit's ``collate_gpt_fn`` feeds ``prompt + ' ' + target`` but
  labels the tokens of ``target`` (no leading space): with a byte-level BPE (GPT-2, SmolLM2) the labels are not
  the tokens the model sees. :func:`fix_target_labels` detects this on one record and relabels with
  ``' ' + target`` (GitHub EasyEdit adds the space itself for a ``GPT2Tokenizer`` ``tokenizer_class``).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import os
import sys
import threading
from typing import Any, Iterable, Iterator, Optional

import torch

from .imports import easyeditor_module

#: EasyEdit's learned editors (trained networks, an ``archive`` file)
LEARNED_EDITORS = ("MEND", "SERAC")

#: ``config.model_type`` -> the substring EasyEdit's MEND/SERAC code looks for in a model name
FAMILY_SUBSTRINGS = {"gpt2": "gpt2", "llama": "llama"}
#: every substring EasyEdit's MEND/SERAC code dispatches on (a name holding one is left as it is)
_KNOWN_FAMILIES = ("gpt", "llama", "t5", "baichuan", "chatglm", "internlm", "qwen", "mistral")


def family_name(name: str, model_type: Optional[str]) -> str:
    """``name`` as EasyEdit's MEND/SERAC need it: unchanged when it already names an architecture they know,
    else with ``model_type`` appended in brackets (``smollm2-135m`` + llama -> ``smollm2-135m (llama)``)."""
    name = str(name)
    low = name.lower()
    if any(f in low for f in _KNOWN_FAMILIES):
        return name
    tag = FAMILY_SUBSTRINGS.get(str(model_type or "").lower())
    return f"{name} ({tag})" if tag else name


def model_type_of(name_or_path: str) -> Optional[str]:
    """``config.model_type`` of a local checkpoint (reads config.json only), or None."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name_or_path).model_type
    except Exception:
        return None


# --------------------------------------------------------------------------------------------------
# higher's functional ModuleList, sliced by transformers 5
# --------------------------------------------------------------------------------------------------

def _patched_modulelist_getitem(orig):
    @functools.wraps(orig)
    def __getitem__(self, idx):
        if isinstance(idx, slice):
            patch = _higher_patch_base()
            if patch is not None and isinstance(self, patch):
                return torch.nn.ModuleList(list(self._modules.values())[idx])
        return orig(self, idx)

    __getitem__.__coachhook_patch__ = True
    return __getitem__


def _higher_patch_base():
    try:
        from higher.patch import _MonkeyPatchBase
    except Exception:  # higher not installed: nothing to fix
        return None
    return _MonkeyPatchBase


@contextlib.contextmanager
def functional_modulelist_slicing() -> Iterator[None]:
    """Scoped: slicing a ``higher``-patched ``ModuleList`` returns a plain ``ModuleList`` of its patched layers."""
    orig = torch.nn.ModuleList.__getitem__
    if _higher_patch_base() is None or getattr(orig, "__coachhook_patch__", False):
        yield
        return
    torch.nn.ModuleList.__getitem__ = _patched_modulelist_getitem(orig)
    try:
        yield
    finally:
        torch.nn.ModuleList.__getitem__ = orig


# --------------------------------------------------------------------------------------------------
# torch.load of archives (weights_only)
# --------------------------------------------------------------------------------------------------

_trusted = threading.local()


def _trusted_paths() -> set:
    if not hasattr(_trusted, "paths"):
        _trusted.paths = set()
    return _trusted.paths


def _norm(path) -> Optional[str]:
    try:
        return os.path.realpath(os.fspath(path))
    except TypeError:
        return None


def _is_trusted(path) -> bool:
    p = _norm(path)
    if p is None:
        return False
    for t in _trusted_paths():
        if p == t or p.startswith(t.rstrip(os.sep) + os.sep):
            return True
    return False


@contextlib.contextmanager
def trusted_archive_loading(paths: Iterable[Any]) -> Iterator[None]:
    """Scoped: ``torch.load`` of one of ``paths`` (a file, or any file under a folder) unpickles fully
    (``weights_only=False``), as EasyEdit's archives need; every other ``torch.load`` is unchanged."""
    added = {p for p in (_norm(x) for x in paths if x) if p} - _trusted_paths()
    if not added:
        yield
        return
    real_load = torch.load
    outermost = not getattr(real_load, "__coachhook_trusted__", False)
    if outermost:
        @functools.wraps(real_load)
        def load(f, *args, **kwargs):
            if "weights_only" not in kwargs and _is_trusted(f):
                kwargs["weights_only"] = False
            return real_load(f, *args, **kwargs)

        load.__coachhook_trusted__ = True
        torch.load = load
    _trusted_paths().update(added)
    try:
        yield
    finally:
        _trusted_paths().difference_update(added)
        if outermost:
            torch.load = real_load


# --------------------------------------------------------------------------------------------------
# the trainer's model, loaded from the real path under an architecture-bearing name
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def trainer_model_loading(names: dict) -> Iterator[None]:
    """Scoped: EasyEdit's trainer ``get_model(config)`` loads ``names[config.model_name]`` (a real checkpoint path)
    when ``config.model_name`` is a :func:`family_name`, and the model's ``name_or_path`` is that name (SERAC reads
    it). Names not in ``names`` load as EasyEdit loads them."""
    module = easyeditor_module("easyeditor.trainer.BaseTrainer")
    orig = getattr(module, "get_model", None) if module is not None else None
    if orig is None or not names:
        yield
        return

    @functools.wraps(orig)
    def get_model(config):
        shown = getattr(config, "model_name", None)
        if shown not in names:
            return orig(config)
        real = copy.copy(config)
        real.model_name = names[shown]
        model = orig(real)
        model.name_or_path = shown
        return model

    module.get_model = get_model
    try:
        yield
    finally:
        module.get_model = orig


# --------------------------------------------------------------------------------------------------
# target labels (PyPI collate_gpt_fn)
# --------------------------------------------------------------------------------------------------

def _label_tokens(labels_row) -> list:
    return [int(t) for t in labels_row.tolist() if int(t) != -100]


def _input_tail(batch_part, n: int) -> list:
    ids, mask = batch_part["input_ids"][0], batch_part["attention_mask"][0]
    kept = [int(t) for t, m in zip(ids.tolist(), mask.tolist()) if m]
    return kept[-n:] if n else []


def labels_match_inputs(dataset, record: dict) -> bool:
    """Does ``dataset.collate_gpt_fn`` label the target tokens the model actually sees (the tail of
    ``prompt + ' ' + target``)?"""
    out = dataset.collate_gpt_fn([record])
    labels = _label_tokens(out["edit_inner"]["labels"][0].cpu())
    return labels == _input_tail({k: v.cpu() for k, v in out["edit_inner"].items() if k != "labels"}, len(labels))


def fix_target_labels(dataset) -> bool:
    """Relabel ``dataset``'s GPT-style batches with the tokens of ``' ' + target`` (and ``' ' + locality answer``)
    when its ``collate_gpt_fn`` labels the target without the space it puts in front of it. Instance-level (the
    dataset object only); returns whether a fix was needed."""
    if not hasattr(dataset, "collate_gpt_fn") or len(dataset) == 0:
        return False
    record = dataset[0]
    if labels_match_inputs(dataset, record):
        return False
    orig = dataset.collate_gpt_fn
    tok = dataset.tok

    def relabel(texts):
        enc = tok([" " + t for t in texts], return_tensors="pt", padding=True, max_length=dataset.max_length,
                  truncation=True)
        return enc, dataset.get_edit_labels(enc["input_ids"])

    @functools.wraps(orig)
    def collate_gpt_fn(batch):
        out = orig(batch)
        device = out["edit_inner"]["input_ids"].device
        _, labels = relabel([b["target_new"] for b in batch])
        out["edit_inner"]["labels"] = labels.to(device)
        out["edit_rephrase"]["labels"] = labels.to(device)
        loc_enc, loc_labels = relabel([b["locality_ground_truth"] for b in batch])
        out["loc"]["decoder_attention_mask"] = loc_enc["attention_mask"].to(device)
        out["loc"]["labels"] = loc_labels.to(device)
        return out

    dataset.collate_gpt_fn = collate_gpt_fn
    if not labels_match_inputs(dataset, record):  # the fix must hold, or training would be silently wrong
        dataset.collate_gpt_fn = orig
        raise RuntimeError("EasyEdit's collate_gpt_fn labels target tokens that are not the ones it feeds the model, "
                           "and relabelling with a leading space did not fix it; check tokenizer_class")
    return True


# --------------------------------------------------------------------------------------------------
# the editing executors
# --------------------------------------------------------------------------------------------------

_EXECUTORS = (("easyeditor.models.mend.mend_main", "MendRewriteExecutor"),
              ("easyeditor.models.serac.serac_main", "SeracRewriteExecutor"))


def _patched_init_model(orig):
    @functools.wraps(orig)
    def init_model(self, model, tok, params, *args, **kwargs):
        with trusted_archive_loading([getattr(params, "archive", None)]):
            result = orig(self, model, tok, params, *args, **kwargs)
        alg = getattr(self, "alg", None)
        if isinstance(alg, torch.nn.Module) and alg.training:
            # PyPI MEND edits with the editor in training mode: its gradient normaliser then overwrites the trained
            # statistics with the first edit's (and raises for a one-token target); editing is inference
            alg.eval()
        return result

    init_model.__coachhook_patch__ = True
    return init_model


def reset_executor(apply_algo) -> bool:
    """Make EasyEdit's MEND/SERAC executor behind ``apply_algo`` (``BaseEditor.apply_algo``) initialise again on its
    next edit. EasyEdit's executors are process-wide singletons (``ALG_DICT['MEND'] = MendRewriteExecutor()...``) that
    keep the model and archive of the *first* editor: a later ``BaseEditor`` (another model, another archive) would
    silently edit the first editor's model. Called for every new MEND/SERAC ``BaseEditor``; returns whether the
    executor held an earlier editor's state."""
    executor = getattr(apply_algo, "__self__", None)
    if executor is None or not getattr(executor, "is_init", False):
        return False
    executor.is_init = False
    return True


@contextlib.contextmanager
def learned_editor_compat() -> Iterator[None]:
    """Scoped fixes for editing with MEND/SERAC archives: the archive named by the hparams loads with
    ``torch.load`` on torch >= 2.6 (also EasyEdit's own archives, which hold a config object), and PyPI MEND's
    functional model works with transformers-5 Llama."""
    saved = []
    for module_name, cls_name in _EXECUTORS:
        module = sys.modules.get(module_name)  # only an EasyEdit already imported (this never imports one)
        cls = getattr(module, cls_name, None) if module is not None else None
        init = getattr(cls, "init_model", None) if cls is not None else None
        if init is None or getattr(init, "__coachhook_patch__", False):
            continue
        saved.append((cls, cls.__dict__.get("init_model")))
        cls.init_model = _patched_init_model(init)
    try:
        with functional_modulelist_slicing():
            yield
    finally:
        for cls, init in saved:
            if init is None:
                del cls.init_model
            else:
                cls.init_model = init
