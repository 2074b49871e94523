"""The passes over the model that set a hook layer's scope (which tokens it takes): the α candidates of a batch
(Eq. 19), the recomputed α (alpha_rule `recomputed`), and the calibrated gate's reference statistics. Each runs
prompts through the model with the state's hooks in a given gate and mode; the equations are in `gate.py`.
`state` is the editor state (`method.CoachHooKState`).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from .edit_requests import EditRequest, pad_id_of, pad_right
from .gate import DEFAULT_CALIBRATION_PROMPTS, alpha_candidate
from .models import get_module, model_device


def compute_alpha_candidates(model, tok, state, requests: Sequence[EditRequest],
                             gate: Optional[str] = None) -> Dict[int, float]:
    """α_c per layer (Eq. 19, `gate.alpha_candidate`): min over the batch of each edit prompt's max z under
    `gate` (default: the active one), outputs unchanged."""
    device = model_device(model)
    with torch.no_grad(), state.gating(gate=gate), ExitStack() as stack:
        max_z = {l: stack.enter_context(h.recording_max_z()) for l, h in state.layers.items()}
        if state.hparams.gate_ignore_padding:  # one padded batch: pad tokens are outside every statistic
            ids, mask = pad_right([tok(r.prompt)["input_ids"] for r in requests], pad_id_of(tok), device)
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        else:  # padding would enter the paper gate's statistics: one prompt per call
            for r in requests:
                ids = torch.tensor([tok(r.prompt)["input_ids"]], device=device)
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
        return {l: alpha_candidate(torch.cat(zs) if zs else torch.empty(0)) for l, zs in max_z.items()}


class _StopForward(Exception):
    """Raised by `_forward_stops_after` once the module it watches has run."""


@contextmanager
def _forward_stops_after(module: torch.nn.Module) -> Iterator[None]:
    """Within: a forward call of the model ends as soon as `module` has run (its own forward hooks included,
    registered earlier). A pass that reads only the hook layers need not run the blocks and head above the last
    one: on SmolLM2 (layers 3–7 of 30, a 49k-token head) that is about a fifth of a full forward."""
    def stop(mod, args, output):
        raise _StopForward

    handle = module.register_forward_hook(stop)
    try:
        yield
    except _StopForward:
        pass
    finally:
        handle.remove()


def recompute_alphas(model, tok, state, prompt_ids: Sequence[Sequence[int]], gate: str,
                     margin: float) -> Dict[int, float]:
    """alpha_rule `recomputed` (beyond the paper; replaces Eq. 19) for one gate: α per layer = min over
    `prompt_ids` (stored edit prompts) of each prompt's max z under the current Δ, minus `margin`
    (`gate.alpha_recomputed`). One right-padded forward call, stopped after the last hook layer, in which each
    layer sets its α before it swaps (`HookLayer.recomputing_alpha`): a layer's α is taken on the keys the lower
    layers give under their new α. Returns the min max z per layer (α + margin; inf where none was finite and α
    stayed as it was)."""
    ids, mask = pad_right([list(p) for p in prompt_ids], pad_id_of(tok), model_device(model))
    last = state.layers[max(state.layers)]
    with torch.no_grad(), state.gating(gate=gate), ExitStack() as stack:
        max_z = {l: stack.enter_context(h.recomputing_alpha(margin)) for l, h in state.layers.items()}
        with _forward_stops_after(get_module(model, last.module_name)):
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        return {l: alpha_candidate(torch.cat(zs) if zs else torch.empty(0)) for l, zs in max_z.items()}


def calibration_prompts(hparams) -> List[str]:
    prompts = getattr(hparams, "gate_calibration_prompts", None)
    return list(prompts) if prompts else list(DEFAULT_CALIBRATION_PROMPTS)


def calibrate_gate(model, tok, state, prompts: Optional[Sequence[str]] = None) -> Dict[int, tuple]:
    """The calibrated gate's reference statistics: mean and std of M = ‖Δk‖ per layer over the real tokens of
    unedited prompts (hparams `gate_calibration_prompts`, default DEFAULT_CALIBRATION_PROMPTS), with every hook
    validated under the calibrated gate. One batched forward pass: hooks run in layer order, so each layer is
    calibrated on the keys it sees at inference (lower layers already gated with their new statistics)."""
    prompts = calibration_prompts(state.hparams) if prompts is None else list(prompts)
    seqs = [list(tok(p)["input_ids"]) for p in prompts]
    ids, mask = pad_right(seqs, pad_id_of(tok), model_device(model))
    with torch.no_grad(), state.attention_mask(mask), ExitStack() as stack:
        for h in state.layers.values():
            stack.enter_context(h.calibrating(mask.bool()))
        model(input_ids=ids, attention_mask=mask)
    return {l: (h.ref_mean, h.ref_std, h.ref_count) for l, h in state.layers.items()}
