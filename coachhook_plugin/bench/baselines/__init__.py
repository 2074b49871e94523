"""Baselines the plugin supplies to EasyEdit where the installed EasyEdit lacks them (one module each):

* ``FT-M``            — :mod:`.ft_m`: fine-tuning with the loss on the target tokens only;
* ``GRACE``           — :mod:`.grace`: key → value codebook with deferral radii (Hartvigsen et al., 2023);
* ``AlphaEdit``       — :mod:`.alphaedit`: MEMIT projected onto the preserved keys' null space (Fang et al., 2025);
* ``CoachHooK-noHK``  — :mod:`.coachhook_no_hooks`: the paper's ablation, CoachHooK's update in the weights;
* ``Unedited``        — :mod:`.unedited`: the base model, scored like every method (the row editors start from).

:func:`register_baselines` puts them in EasyEdit's tables through the registry's ``register_method``;
EasyEdit's own GRACE / AlphaEdit win where they exist (``prefer_easyedit=True``). They are the benchmark's:
``import coachhook_plugin`` registers CoachHooK only; the bench (and whoever else wants them) calls
:func:`register_baselines` explicitly.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

LOG = logging.getLogger(__name__)


def _specs():
    from . import alphaedit, coachhook_no_hooks, ft_m, grace, unedited

    # name: (apply_fn, hparams class factory, batchable, callable restore, padding side)
    return {
        ft_m.ALG_NAME: (ft_m.apply_ft_m_to_model, lambda: ft_m.FTMHyperParams, True, True, None),
        grace.ALG_NAME: (grace.apply_grace_to_model, lambda: grace.GRACEHyperParams, True, True, None),
        alphaedit.ALG_NAME: (alphaedit.apply_alphaedit_to_model, lambda: alphaedit.AlphaEditHyperParams,
                             True, True, "right"),
        coachhook_no_hooks.ALG_NAME: (coachhook_no_hooks.apply_coachhook_no_hooks_to_model,
                                      coachhook_no_hooks.CoachHooKNoHooksHyperParams, True, True, "right"),
        unedited.ALG_NAME: (unedited.apply_unedited_to_model, lambda: unedited.UneditedHyperParams, True, True, None),
    }


def easyedit_has(name: str) -> bool:
    """Whether the installed EasyEdit itself dispatches ``name`` (not counting what the plugin registered)."""
    from coachhook_plugin.easyedit.registry import easyedit_dispatches

    return easyedit_dispatches(name)


def register_baselines(prefer_easyedit: bool = True) -> Dict[str, bool]:
    """Register every plugin baseline EasyEdit lacks; returns {name: registered by the plugin}."""
    from coachhook_plugin.easyedit.registry import register_method

    done = {}
    for name, (apply_fn, hp_factory, batchable, callable_restore, side) in _specs().items():
        if prefer_easyedit and easyedit_has(name):
            done[name] = False
            continue
        register_method(name, apply_fn, hp_factory(), batchable=batchable, callable_restore=callable_restore,
                        padding_side=side)
        done[name] = True
    return done


def hparams_class(name: str) -> Optional[type]:
    spec = _specs().get(name)
    return spec[1]() if spec else None
