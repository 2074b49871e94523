"""The paper's ablation "CoachHooK w/o HK": CoachHooK's consecutive update written into the weights.

Each batch runs CoachHooK unchanged (values, per-layer keys and residuals, Δ from the accumulated Σkkᵀ of
every earlier batch), then Δ is folded into the base down-projection weight and zeroed in the hook layer.
Σkkᵀ stays, so later batches still solve the consecutive least-squares problem of Eq. 13–14; what goes
away is the hook layer with its gate: every token now sees the edited weight. The public state contract
(`get_state`, `HookLayer.delta`, `snapshot()/restore()`) is all this uses; CoachHooK's code is untouched.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Tuple

import torch

from ._common import clone_parameters, put_back

ALG_NAME = "CoachHooK-noHK"


def _coachhook():
    from coachhook_plugin import hparams as hp_module, method

    return hp_module, method


def hyperparams_class():
    """CoachHooK's hparams with ``alg_name: CoachHooK-noHK`` (EasyEdit dispatches on the name)."""
    hp_module, _ = _coachhook()
    base = hp_module.CoachHooKHyperParams

    @dataclasses.dataclass
    class CoachHooKNoHooksHyperParams(base):
        alg_name: str = ALG_NAME

        def validate(self) -> None:
            name, self.alg_name = self.alg_name, hp_module.ALG_NAME  # CoachHooK's checks, for its fields
            try:
                super().validate()
            finally:
                self.alg_name = name

        @classmethod
        def from_dict(cls, config, source: str = "hparams"):
            config = dict(config)
            config.pop("alg_name", None)
            hp = base.from_dict(config, source=source)  # CoachHooK's loader and field checks
            fields = {f.name: getattr(hp, f.name) for f in dataclasses.fields(base)}
            fields["alg_name"] = ALG_NAME
            return cls(**fields)

    return CoachHooKNoHooksHyperParams


_HPARAMS_CLASS = None


def CoachHooKNoHooksHyperParams():  # noqa: N802 (a lazily built class)
    global _HPARAMS_CLASS
    if _HPARAMS_CLASS is None:
        _HPARAMS_CLASS = hyperparams_class()
    return _HPARAMS_CLASS


def as_no_hooks(hparams):
    """CoachHooK hparams → the same settings for the ablation."""
    cls = CoachHooKNoHooksHyperParams()
    if isinstance(hparams, cls):
        return hparams
    return cls.from_dict({k: v for k, v in dataclasses.asdict(hparams).items() if k != "alg_name"}
                         if not isinstance(hparams, dict) else hparams)


def _zero_delta(hook, delta) -> None:
    if hasattr(hook, "set_delta_dense"):  # hook layers that may keep Δ factored: replace it through their API
        hook.set_delta_dense(torch.zeros_like(delta))
    else:
        hook.delta.zero_()


def fold_deltas_into_weights(model) -> Dict[int, float]:
    """W_0 += Δ and Δ = 0 for every hook layer (Σkkᵀ, α and the key count are kept). Returns ‖Δ‖ per layer."""
    _, method = _coachhook()
    from coachhook_plugin.models import get_module, weight_out_in

    state = method.get_state(model)
    norms = {}
    with torch.no_grad():
        for layer, hook in state.layers.items():
            w = weight_out_in(get_module(model, hook.module_name))  # (out, in) view of the stored weight
            delta = hook.delta  # dense Δ (materialised if the hook layer stores it in factored form)
            w.add_(delta.to(device=w.device, dtype=w.dtype))
            norms[layer] = float(delta.norm())
            _zero_delta(hook, delta)
    return norms


def apply_coachhook_no_hooks_to_model(model, tok, requests: List[Dict], hparams, copy: bool = False,
                                      return_orig_weights: bool = False, keep_original_weight: bool = False,
                                      **kwargs) -> Tuple[torch.nn.Module, Callable[[], None]]:
    """EasyEdit's apply contract; the returned handle restores weights and hook state (single-round)."""
    _, method = _coachhook()
    if copy:
        model = method.copy_model(model)
    names = [hparams.rewrite_module_tmp.format(l) for l in hparams.layers]
    weights = {f"{n}.weight": model.get_submodule(n).weight for n in names}
    saved_weights = clone_parameters(weights)
    state = method.get_state(model)
    saved_state = state.snapshot() if state is not None else None
    model, handle = method.apply_coachhook_to_model(model, tok, requests, hparams, copy=False,
                                                    keep_original_weight=keep_original_weight, **kwargs)
    method.get_state(model).last_folded = fold_deltas_into_weights(model)

    @torch.no_grad()
    def restore():
        put_back(model, saved_weights)
        if saved_state is not None:
            method.get_state(model).restore(saved_state)
        else:
            method.remove_coachhook(model)

    return model, restore  # a plain callable: the registry's RestoreHandle serves it to either EasyEdit
