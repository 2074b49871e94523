"""FT-M: fine-tuning one FFN module with the loss on the target tokens only (EasyEdit's FT with
``objective_optimization: target_new``), supplied by the plugin where the installed EasyEdit lacks it.

EasyEdit's PyPI FT ("FT-L") scores every target token from the *last prompt position*; FT-M instead feeds
``prompt + target`` and masks the prompt out of a teacher-forced cross-entropy, so each target token is
predicted from its own prefix. Same parameters (``rewrite_module_tmp`` at ``layers``), Adam, the
L∞ ``norm_constraint`` around the original weights and the early stop at loss < 1e-2, as EasyEdit's FT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, List, Optional, Tuple

import functools

import torch

from ._common import (BaselineHyperParams, clone_parameters, model_device, module_parameters, put_back,
                      target_batch, target_nll)

ALG_NAME = "FT-M"
STOP_LOSS = 1e-2  # EasyEdit's FT stops once the average loss is below this


@dataclass
class FTMHyperParams(BaselineHyperParams):
    ALG_NAME: ClassVar[str] = ALG_NAME
    layers: List[int]
    rewrite_module_tmp: str
    num_steps: int = 25
    lr: float = 5e-4
    weight_decay: float = 0.0
    norm_constraint: Optional[float] = 5e-4  # L∞ distance from the original weights; null/false: unconstrained
    kl_factor: float = 0.0  # accepted for EasyEdit compatibility; FT-M has no KL term
    layer_module_tmp: str = ""
    mlp_module_tmp: str = ""
    attn_module_tmp: str = ""
    ln_f_module: str = ""
    lm_head_module: str = ""

    def __post_init__(self):
        super().__post_init__()
        if not self.layers:
            raise ValueError("FT-M hparams 'layers' must name at least one layer, e.g. [5]")
        self.num_steps, self.batch_size = int(self.num_steps), max(1, int(self.batch_size))
        if self.norm_constraint is False:  # EasyEdit's FT spells "unconstrained" as false (its Llama yaml)
            self.norm_constraint = None
        elif self.norm_constraint is not None:
            self.norm_constraint = float(self.norm_constraint)


def execute_ft_m(model, tok, requests: List[Dict], hparams: FTMHyperParams) -> Dict[str, torch.Tensor]:
    """Fine-tune in place; returns the original values of the parameters that were trained."""
    params = module_parameters(model, hparams.rewrite_module_tmp, hparams.layers)
    originals = clone_parameters(params)
    device = model_device(model)
    grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    opt = torch.optim.Adam(list(params.values()), lr=hparams.lr, weight_decay=hparams.weight_decay)
    eps = hparams.norm_constraint
    try:
        for _ in range(hparams.num_steps):
            total, count = 0.0, 0
            for s in range(0, len(requests), hparams.batch_size):
                chunk = requests[s:s + hparams.batch_size]
                ids, mask, labels = target_batch(tok, [r["prompt"] for r in chunk],
                                                 [r["target_new"] for r in chunk], device)
                opt.zero_grad()
                loss = target_nll(model, ids, mask, labels)
                if loss.item() >= STOP_LOSS:
                    loss.backward()
                    opt.step()
                if eps is not None:
                    with torch.no_grad():
                        for n, p in params.items():
                            p.copy_(torch.clamp(p, originals[n] - eps, originals[n] + eps))
                total, count = total + loss.item() * len(chunk), count + len(chunk)
            if total / count < STOP_LOSS:
                break
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(grad_before[n])
    return originals


def apply_ft_m_to_model(model, tok, requests: List[Dict], hparams: FTMHyperParams, copy: bool = False,
                        return_orig_weights: bool = False, keep_original_weight: bool = False,
                        **kwargs) -> Tuple[torch.nn.Module, Callable[[], None]]:
    """EasyEdit's apply contract. The returned handle puts the original weights back when EasyEdit rolls the
    edit back: PyPI EasyEdit through ``.items()`` only with ``keep_original_weight`` (as its own FT), GitHub
    EasyEdit by calling it (``CALLABLE_RESTORE_ALGS``) when ``sequential_edit`` is off. A dict of originals
    cannot serve both: PyPI restores whatever dict it gets, GitHub always asks for the originals."""
    if copy:
        import copy as copy_module

        model = copy_module.deepcopy(model)
    originals = execute_ft_m(model, tok, requests, hparams)
    return model, functools.partial(put_back, model, originals)  # the registry's RestoreHandle serves it to EasyEdit
