"""Edit time, side by side: one consecutive batch with CoachHooK (split by phase) and with EasyEdit's MEMIT.

Both run on the same model, requests, layers, statistics, value settings and context templates, in one
process, one after the other (CoachHooK's hooks are detached in between, so MEMIT edits the base model).
The split is taken by timing the functions `execute_coachhook` calls — values, keys, the solve, the gate's
calibration and the α pass — without touching the method's code.
"""
from __future__ import annotations

import contextlib
import time
from typing import Dict, List, Sequence

import torch

PHASES = {"values": ("compute_values", "compute_value"), "keys": ("compute_keys_and_hidden",),
          "solve": ("hook_update", "accumulated_keys_for"), "gate calibration": ("calibrate_gate",),
          "alpha pass": ("compute_alpha_candidates",)}


@contextlib.contextmanager
def phase_timer(module, phases: Dict[str, Sequence[str]] = PHASES):
    """Wrap the named functions of `module` so that the seconds spent in each phase add up in the yielded dict."""
    seconds = {p: 0.0 for p in phases}
    saved = {}

    def timed(fn, phase):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seconds[phase] += time.perf_counter() - t
        return wrapper

    for phase, names in phases.items():
        for name in names:
            if hasattr(module, name):
                saved[name] = getattr(module, name)
                setattr(module, name, timed(saved[name], phase))
    try:
        yield seconds
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def _batch_kwargs(records: Sequence[Dict]) -> Dict[str, List[str]]:
    return dict(prompts=[r["prompt"] for r in records], target_new=[r["target_new"] for r in records],
                ground_truth=[r["ground_truth"] for r in records], subject=[r["subject"] for r in records])


def edit_time(model, tok, hparams, memit_hparams, records: Sequence[Dict]) -> Dict[str, object]:
    """Seconds per edit for one batch of `records` with CoachHooK (and its split) and EasyEdit's MEMIT."""
    from . import method, remove_coachhook
    from .easyedit.compat import editing_context, make_editor, memit_context_templates

    n = len(records)
    editor = make_editor(hparams, model, tok)
    with editing_context(), phase_timer(method) as split:
        t = time.perf_counter()
        editor.batch_edit(**_batch_kwargs(records), keep_original_weight=False, verbose=False)
        coachhook_s = time.perf_counter() - t
    remove_coachhook(model)
    split["other"] = coachhook_s - sum(split.values())

    weights = {n_: p.detach().clone() for n_, p in model.named_parameters()
               if any(n_.startswith(memit_hparams.rewrite_module_tmp.format(l)) for l in memit_hparams.layers)}
    editor = make_editor(memit_hparams, model, tok)
    with editing_context(), memit_context_templates(hparams.context_templates or ["{}"]):
        t = time.perf_counter()
        editor.batch_edit(**_batch_kwargs(records), keep_original_weight=False, verbose=False)
        memit_s = time.perf_counter() - t
    with torch.no_grad():  # MEMIT wrote into the weights: put them back for whoever measures next
        params = dict(model.named_parameters())
        for name, w in weights.items():
            params[name].copy_(w)
    return {"edits": n, "coachhook_seconds_per_edit": coachhook_s / n, "memit_seconds_per_edit": memit_s / n,
            "ratio": coachhook_s / memit_s, "coachhook_split_seconds": split, "threads": torch.get_num_threads()}
