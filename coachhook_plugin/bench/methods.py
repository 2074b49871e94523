"""One benchmarked method: its hparams, an EasyEdit ``BaseEditor`` on a fresh copy of the model, and the
edit / roll-back steps the protocols call.

Edits go through the editor's own dispatch (``editor.apply_algo``: EasyEdit's ``ALG_DICT`` entry for
``alg_name``, the plugin's registrations included) on ``editor.model`` with EasyEdit's request dicts, so
every method runs exactly what ``BaseEditor.edit/batch_edit`` would run. ``batch_edit`` itself is not
called: it would score every batch with EasyEdit's per-record loop (and PyPI scores "pre" after the
edit); the bench scores once per checkpoint with one evaluator for all methods instead.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import yaml

from ..easyedit import archives, edit_kwargs, editor, hparams_files, patches, results, serac_memory
from ..easyedit.learned_editors import LEARNED_EDITORS
from .data import easyedit_request

LOG = logging.getLogger(__name__)

#: alg_names whose hparams class the plugin provides (the rest are EasyEdit's <Alg>HyperParams)
SHARED_TEMPLATE_ALGS = ("MEMIT", "AlphaEdit", "ROME")  # read EasyEdit's context-template caches (memit_main, rome_main)
COACHHOOK_FAMILY = ("CoachHooK", "CoachHooK-noHK")


class MethodError(RuntimeError):
    pass


def register_bench_methods() -> bool:
    """CoachHooK and the plugin's baselines (FT-M, GRACE, AlphaEdit, CoachHooK w/o HK, where EasyEdit lacks them)
    in EasyEdit's tables: the bench's methods, registered by the bench (``import coachhook_plugin`` registers
    CoachHooK only). Idempotent; False when EasyEdit is not importable."""
    import coachhook_plugin

    from .baselines import register_baselines

    if not coachhook_plugin.register():
        return False
    try:
        register_baselines()
    except Exception as exc:  # a baseline must never stop CoachHooK from running
        LOG.warning("coachhook-plugin baselines not registered with EasyEdit: %s", exc)
    return True


def hparams_class(alg_name: str):
    import coachhook_plugin
    from ..easyedit import registry

    register_bench_methods()
    if alg_name == "CoachHooK":
        return coachhook_plugin.CoachHooKHyperParams
    cls = registry.hparams_class(alg_name)  # a plugin baseline registered because EasyEdit lacks it
    if cls is not None:
        return cls
    if plugin_implementation(alg_name) is not None:
        return plugin_implementation(alg_name)[1]
    cls = hparams_files.easyedit_hparams_class(alg_name)  # e.g. GitHub EasyEdit's GRACE class is GraceHyperParams
    if cls is None:
        raise MethodError(f"the installed EasyEdit has no {alg_name}HyperParams and the plugin does not supply "
                          f"{alg_name}; pick one of the registered methods or install a newer EasyEdit")
    return cls


def plugin_implementation(alg_name: str):
    """(apply_fn, hparams class) of the plugin's own implementation of ``alg_name`` when the installed EasyEdit's
    cannot edit an arbitrary model (:func:`hparams_files.easyedit_method_limits`), else None: the bench then runs the
    plugin's (the same algorithm; it edits any model) and says so in the log."""
    why = hparams_files.easyedit_method_limits(alg_name)
    if why is None:
        return None
    from . import baselines

    spec = baselines._specs().get(alg_name)
    if spec is None:
        return None
    LOG.warning("%s: %s; the bench runs the plugin's %s instead", alg_name, why, alg_name)
    return spec[0], spec[1]()


def load_hparams(alg_name: str, path: Path, overrides: Dict[str, Any]):
    """Load ``path`` with the method's hparams class; ``overrides`` replace fields (checked to exist)."""
    if not path.exists():
        raise MethodError(f"hparams file {path} not found for {alg_name}; write one (see hparams/{alg_name}/) "
                          f"or point method_settings.<name>.hparams at it")
    cls = hparams_class(alg_name)
    config = yaml.safe_load(path.read_text()) or {}
    if alg_name == "CoachHooK-noHK":  # the ablation reads CoachHooK's own file: same settings
        config["alg_name"] = "CoachHooK-noHK"
    if hasattr(cls, "from_dict"):
        hp = cls.from_dict(config, source=str(path)) if "source" in _params(cls.from_dict) else \
            cls.from_dict(config)
    else:  # EasyEdit's class: one yaml loads with PyPI's and GitHub's (missing fields filled, unknown ones dropped)
        try:
            hp = hparams_files.hparams_from_config(cls, config, source=str(path))
        except (TypeError, ValueError) as exc:
            raise MethodError(str(exc)) from exc
    for key, value in (overrides or {}).items():
        if not hasattr(hp, key):
            raise MethodError(f"{alg_name} hparams have no field {key!r} (from overrides); known: "
                              f"{', '.join(sorted(vars(hp)))}")
        setattr(hp, key, value)
    if overrides and hasattr(hp, "validate"):
        hp.validate()
    return hp


def registry_lacks(alg_name: str) -> bool:
    """Whether the plugin did not register its own ``alg_name`` with EasyEdit (EasyEdit has one)."""
    from ..easyedit import registry

    return registry.hparams_class(alg_name) is None


def _params(fn) -> List[str]:
    import inspect

    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


def hparams_dict(hp) -> Dict[str, Any]:
    d = dataclasses.asdict(hp) if dataclasses.is_dataclass(hp) else dict(vars(hp))
    if not isinstance(d.get("model_name"), (str, type(None))):
        d["model_name"] = str(getattr(hp, "model_name", ""))
    return results.to_builtin(d)


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "unload")


class MethodRunner:
    """A method on its own fresh model: ``edit(records, single_round)`` → restore handles; ``roll_back``."""

    def __init__(self, key: str, settings, hparams_path: Path, model_name: str, device=None,
                 stats_dir: Optional[str] = None, context_templates: Optional[List[str]] = None):
        self.key, self.label, self.alg_name = key, settings.label, settings.alg_name
        self.hparams_path = hparams_path
        self.hparams = load_hparams(self.alg_name, hparams_path, dict(settings.overrides or {}))
        self.hparams.model_name = model_name
        if self.alg_name in LEARNED_EDITORS:  # MEND/SERAC: method_settings.<name>.archive, else the hparams' own
            archive = settings.get("archive") if hasattr(settings, "get") else getattr(settings, "archive", None)
            if archive:
                self.hparams.archive = os.path.expanduser(str(archive))
            # before the editor is built: a missing archive is one sentence naming the `coachhook train` command
            self.hparams.archive = archives.check_archive(self.alg_name, getattr(self.hparams, "archive", None))
        if device is not None:
            self.hparams.device = device
        if stats_dir is not None and hasattr(self.hparams, "stats_dir"):
            self.hparams.stats_dir = stats_dir
        self.context_templates = context_templates
        if context_templates and self.alg_name in COACHHOOK_FAMILY and not self.hparams.context_templates:
            self.hparams.context_templates = list(context_templates)
        self.editor = None

    @property
    def batchable(self) -> bool:
        """Whether one dispatch call writes every record (ROME/KN read the first request only)."""
        return edit_kwargs.is_batchable(self.alg_name)

    @property
    def needs_stats(self) -> bool:
        return bool(getattr(self.hparams, "mom2_adjustment", False)) and hasattr(self.hparams, "mom2_dataset")

    def start(self, model, tok):
        """Build the EasyEdit editor on ``model`` (a fresh base model for this method)."""
        self.editor = editor.make_editor(self.hparams, model=model, tok=tok)
        own = plugin_implementation(self.alg_name) if registry_lacks(self.alg_name) else None
        if own is not None:
            self.editor.apply_algo = own[0]
        editor.apply_padding_side(self.editor.tok, self.alg_name, self.editor.model)
        return self.editor

    @property
    def model(self):
        """The model to score: the edited model (a SERAC-edited one seen through its memory, classifier and
        counterfactual model: :class:`~coachhook_plugin.easyedit.serac_memory.SeracView`)."""
        return serac_memory.evaluation_view(self.editor.model)

    @property
    def tok(self):
        return self.editor.tok

    def _templates_scope(self):
        if self.context_templates and self.alg_name in SHARED_TEMPLATE_ALGS:
            return patches.memit_context_templates(self.context_templates)
        return nullcontext()

    def edit(self, records: List[Dict], single_round: bool) -> List[Any]:
        """Apply ``records`` in one call of EasyEdit's dispatch; returns what :meth:`roll_back` needs.

        Only give a method that is not :attr:`batchable` one record at a time.
        """
        if len(records) > 1 and not self.batchable:
            raise ValueError(f"{self.alg_name} writes only the first request of a list (EasyEdit cannot batch "
                             f"it); edit its records one at a time")
        requests = [easyedit_request(r) for r in records]
        before = self.editor.model
        if self.alg_name == "SERAC":  # EasyEdit's executor forgets earlier calls' edits: start from the memory so far
            serac_memory.set_executor_memory(self.editor.apply_algo, before)
        with patches.editing_context(), self._templates_scope():
            edited, weights_copy = self.editor.apply_algo(
                self.editor.model, self.editor.tok, requests, self.editor.hparams, copy=False,
                return_orig_weights=single_round, keep_original_weight=single_round)
        if self.alg_name == "SERAC":  # a new SERAC holding every edit so far; no weight changed
            self.editor.model = edited
            return [serac_memory.MemoryRollback(before)]
        edited = results.unwrap_edited_model(self.editor.model, edited)  # GitHub's GRACE returns its wrapper
        if is_peft_model(edited) and not single_round:
            # consecutive LoRA: merge each batch's adapter into the weights, so the next batch adapts the
            # edited model (a second adapter cannot be stacked on EasyEdit's PeftModel)
            edited = edited.merge_and_unload()
        self.editor.model = edited
        return [weights_copy]

    def roll_back(self, weights_copy) -> None:
        if isinstance(weights_copy, serac_memory.MemoryRollback):  # the model and memory from before that edit
            self.editor.model = weights_copy.model
            serac_memory.set_executor_memory(self.editor.apply_algo, weights_copy.model)
            return
        if is_peft_model(self.editor.model):
            self.editor.model = self.editor.model.unload()  # the LoRA layers out, the base weights as they were
            return
        results.restore_weights(self.editor.model, weights_copy)
