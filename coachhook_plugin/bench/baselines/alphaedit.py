"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the null space of the preserved keys.

The plugin's own implementation, used where the installed EasyEdit has no AlphaEdit. It reuses EasyEdit's
MEMIT pieces (``compute_z`` for the values, ``compute_ks`` for the keys, ``get_cov`` for E[kkᵀ] from the
same statistics files as MEMIT and CoachHooK) and changes only the least-squares step, per edited layer:

    P  = Û Ûᵀ,  Û = eigenvectors of E[k kᵀ] (preserved knowledge) with eigenvalue < nullspace_threshold
    Δ  = R Kᵀ P (C_p P + K Kᵀ P + L2·I)⁻¹          (computed as a solve, never an explicit inverse)

R: the batch's residual share at this layer (MEMIT's), K: its keys, C_p: Σ K Kᵀ of every earlier batch
(the consecutive part: earlier edits are protected too). Because P k₀ = 0 for preserved keys,
Δ k₀ = 0: outputs on the preserved subspace do not move.
"""
from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, List, Optional, Tuple

import torch

from ._common import BaselineHyperParams, clone_parameters, put_back

ALG_NAME = "AlphaEdit"
STATE_ATTR = "_alphaedit_state"


@dataclass
class AlphaEditHyperParams(BaselineHyperParams):
    ALG_NAME: ClassVar[str] = ALG_NAME
    # MEMIT's fields (EasyEdit's compute_z / compute_ks / get_cov read them)
    layers: List[int]
    rewrite_module_tmp: str
    layer_module_tmp: str
    mlp_module_tmp: str
    attn_module_tmp: str
    ln_f_module: str
    lm_head_module: str
    fact_token: str = "subject_last"
    layer_selection: str = "all"
    v_num_grad_steps: int = 25
    v_lr: float = 5e-1
    v_loss_layer: int = -1
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    mom2_adjustment: bool = True
    mom2_update_weight: float = 15000.0  # unused by AlphaEdit's step; kept so MEMIT yamls load unchanged
    mom2_dataset: str = "wikipedia"
    mom2_n_samples: int = 100000
    mom2_dtype: str = "float32"
    stats_dir: str = "./data/stats"
    # AlphaEdit
    nullspace_threshold: float = 2e-2  # eigenvalues of E[kkᵀ] below this span the null space (paper: 2e-2)
    L2: float = 10.0  # ridge term of the projected solve (paper: 10)
    batch_size: int = field(default=10, kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        self.layers = sorted(int(l) for l in self.layers)
        self.v_num_grad_steps, self.mom2_n_samples = int(self.v_num_grad_steps), int(self.mom2_n_samples)


# ------------------------------------------------------------------------------------------ the maths
def null_space_projection(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = Û Ûᵀ over the eigenvectors of the (symmetric) preserved-key covariance with eigenvalue < threshold."""
    eigvals, eigvecs = torch.linalg.eigh(cov.double())
    small = eigvecs[:, eigvals < threshold]
    if small.shape[1] == 0:
        raise ValueError(f"AlphaEdit: no eigenvalue of E[kkᵀ] is below nullspace_threshold={threshold} "
                         f"(smallest {float(eigvals.min()):.3g}); raise nullspace_threshold in the hparams")
    return small @ small.t()


def projected_update(residual: torch.Tensor, keys: torch.Tensor, previous_gram: torch.Tensor,
                     projection: torch.Tensor, l2: float) -> torch.Tensor:
    """Δ (d_out × d_in) = R Kᵀ P (C_p P + K Kᵀ P + L2·I)⁻¹, in float64.

    Solved in the transposed form (P (K Kᵀ + C_p) + L2·I) X = P K Rᵀ, Δ = Xᵀ — the same matrix, since
    (P M + a I)⁻¹ P = P (M P + a I)⁻¹ for symmetric M, P."""
    K, R, P = keys.double(), residual.double(), projection.double()
    C = previous_gram.double().to(K.device)
    lhs = P @ (K @ K.t() + C) + l2 * torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    rhs = P @ K @ R.t()
    return torch.linalg.solve(lhs, rhs).t()


# ------------------------------------------------------------------------------------------ the state
class AlphaEditState:
    """Per edited layer: the null-space projection (computed once) and Σ K Kᵀ of the edits so far."""

    def __init__(self):
        self.projections: Dict[int, torch.Tensor] = {}
        self.key_grams: Dict[int, torch.Tensor] = {}
        self.step = 0

    def snapshot(self) -> dict:
        return {"step": self.step, "key_grams": {l: g.clone() for l, g in self.key_grams.items()}}

    def restore(self, snap: dict) -> None:
        self.step, self.key_grams = snap["step"], {l: g.clone() for l, g in snap["key_grams"].items()}


def get_state(model) -> Optional[AlphaEditState]:
    return getattr(model, STATE_ATTR, None)


def _ensure_state(model) -> AlphaEditState:
    state = get_state(model)
    if state is None:
        state = AlphaEditState()
        object.__setattr__(model, STATE_ATTR, state)
    return state


def _memit():
    from coachhook_plugin.easyedit.imports import import_easyeditor

    import_easyeditor()
    from easyeditor.models.memit import compute_ks as ks_module, compute_z as z_module, memit_main

    return memit_main, ks_module, z_module


def _match_shape(update: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if update.shape == weight.shape:
        return update
    if update.t().shape == weight.shape:  # GPT-2 Conv1D stores (in, out)
        return update.t()
    raise ValueError(f"AlphaEdit update {tuple(update.shape)} does not fit weight {tuple(weight.shape)}")


def _projection(state: AlphaEditState, model, tok, hparams: AlphaEditHyperParams, layer: int, device) -> torch.Tensor:
    if layer not in state.projections:
        memit_main, _, _ = _memit()
        cov = memit_main.get_cov(model, tok, hparams.rewrite_module_tmp.format(layer), hparams.mom2_dataset,
                                 hparams.mom2_n_samples, hparams.mom2_dtype, hparams=hparams)
        state.projections[layer] = null_space_projection(cov.to(device), hparams.nullspace_threshold)
    return state.projections[layer].to(device)


def execute_alphaedit(model, tok, requests: List[Dict], hparams: AlphaEditHyperParams,
                      state: AlphaEditState) -> Dict[int, float]:
    """One batch, written into the weights in place; returns the update norm per layer."""
    memit_main, ks_module, z_module = _memit()
    requests = deepcopy(requests)
    for r in requests:  # MEMIT's request conventions: " target", prompt with "{}" for the subject
        if not r["target_new"].startswith(" "):
            r["target_new"] = " " + r["target_new"]
        if "{}" not in r["prompt"]:
            if r["subject"] not in r["prompt"]:
                raise ValueError(f"AlphaEdit: subject {r['subject']!r} does not occur in prompt {r['prompt']!r}")
            r["prompt"] = r["prompt"].replace(r["subject"], "{}", 1)
    templates = memit_main.get_context_templates(model, tok)
    z_layer = hparams.layers[-1]
    zs = torch.stack([z_module.compute_z(model, tok, r, hparams, z_layer, templates) for r in requests], dim=1)
    norms = {}
    for i, layer in enumerate(hparams.layers):
        keys = ks_module.compute_ks(model, tok, requests, hparams, layer, templates).T  # (d_in, n·templates)
        current = z_module.get_module_input_output_at_words(
            model, tok, z_layer, context_templates=[r["prompt"] for r in requests],
            words=[r["subject"] for r in requests], module_template=hparams.layer_module_tmp,
            fact_token_strategy=hparams.fact_token, track="out").T
        targets = (zs - current).repeat_interleave(keys.shape[1] // zs.shape[1], dim=1)
        residual = targets / (len(hparams.layers) - i)  # MEMIT: spread the residual over the layers left
        P = _projection(state, model, tok, hparams, layer, keys.device)
        gram = state.key_grams.get(layer)
        if gram is None:
            gram = torch.zeros(keys.shape[0], keys.shape[0], dtype=torch.float64)
        delta = projected_update(residual, keys, gram, P, hparams.L2)
        weight = model.get_submodule(hparams.rewrite_module_tmp.format(layer)).weight
        with torch.no_grad():
            weight.add_(_match_shape(delta, weight).to(weight.dtype))
        # keys at this layer depend only on layers below, already updated: they are the post-edit keys
        state.key_grams[layer] = gram.to(keys.device) + keys.double() @ keys.double().t()
        norms[layer] = float(delta.norm())
    state.step += 1
    return norms


def apply_alphaedit_to_model(model, tok, requests: List[Dict], hparams: AlphaEditHyperParams, copy: bool = False,
                             return_orig_weights: bool = False, keep_original_weight: bool = False,
                             **kwargs) -> Tuple[torch.nn.Module, Callable[[], None]]:
    """EasyEdit's apply contract. Consecutive calls accumulate the earlier edits' keys; with
    ``keep_original_weight`` a batch starts without them and the returned handle puts back both the
    weights and the key Gram matrices (single-round)."""
    if copy:
        model = deepcopy(model)
    state = _ensure_state(model)
    weights = {f"{hparams.rewrite_module_tmp.format(l)}.weight":
               model.get_submodule(hparams.rewrite_module_tmp.format(l)).weight for l in hparams.layers}
    saved_weights, saved_state = clone_parameters(weights), state.snapshot()
    if keep_original_weight:
        state.restore({"step": 0, "key_grams": {}})
    try:
        state.last_update_norms = execute_alphaedit(model, tok, requests, hparams, state)
    except BaseException:
        put_back(model, saved_weights)
        state.restore(saved_state)
        raise

    @torch.no_grad()
    def restore():
        put_back(model, saved_weights)
        state.restore(saved_state)

    return model, restore  # a plain callable: the registry's RestoreHandle serves it to either EasyEdit
