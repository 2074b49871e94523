"""One batch of CoachHooK edits, end to end, and the editor state that persists between batches.

Data flows one way: requests → values (model with validated hooks) → per layer: keys and residual
(temporary hooks) → Δ → hook state → α pass → gate at inference. The base weights never change.
"""
from __future__ import annotations

import copy as copy_module
import os
import weakref
from contextlib import ExitStack, contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .edit_requests import EditRequest, pad_id_of, prepare_requests
from .gate import GATES, RECOMPUTED, TEMPORARY, VALIDATED, alpha_next, alpha_prompt_sample
from .hook import HookLayer
from .hparams import CoachHooKHyperParams
from .keys import compute_keys_and_hidden
from .models import down_proj_shape, get_module, model_device
from .scope import calibrate_gate, compute_alpha_candidates, recompute_alphas
from .stats import load_second_moment, path_for
from .update import accumulated_keys_for, hook_update
from .values import compute_values, frozen

STATE_ATTR = "_coachhook_state"
MEMIT_TEMPLATE_PREFIXES = ("The", "Therefore", "Because", "I", "You")


class CoachHooKState:
    """Everything CoachHooK adds to a model: one HookLayer per edited layer, the step count, templates.

    Kept as a plain attribute (not a submodule) so the model's state_dict and parameters are unchanged.
    """

    def __init__(self, model: torch.nn.Module, hparams: CoachHooKHyperParams):
        self.hparams = hparams
        self.layers: Dict[int, HookLayer] = {}
        self.step = 0  # number of batches written
        self.journal: List[dict] = []  # undo: snapshot from before each recent batch, newest last (≤ undo_depth)
        # Identifies the newest batch while the state is exactly what that batch left; any restore or reset clears
        # it, so a BatchRestore from an earlier batch can tell that it would roll back more than its own batch.
        self.newest_batch_token: Optional[object] = None
        self.context_templates: Optional[List[str]] = None
        # Token ids of every edit prompt written so far, oldest first (kept whatever the alpha_rule, so the rule can
        # be switched on an edited model): the prompts the recomputed α must keep firing on
        self.alpha_prompts: List[Tuple[int, ...]] = []
        self.priors: Dict[int, torch.Tensor] = {}  # E[kkᵀ] per layer, read once
        self.prior_sources: Dict[int, str] = {}  # the file (or 'identity') each prior was read from
        self._mask: Optional[torch.Tensor] = None
        names = [hparams.rewrite_module_tmp.format(l) for l in hparams.layers]
        for name in names:  # check every module before attaching anything
            down_proj_shape(get_module(model, name))  # a clear TypeError for a non hook-able module
        for l, name in zip(hparams.layers, names):
            hook = HookLayer(name, get_module(model, name), hparams.alpha_z, gate=hparams.gate,
                             key_scope_cosine=hparams.key_scope_cosine)
            hook.mask_source = lambda: self._mask
            self.layers[l] = hook
        self._model_hooks = []
        self.attach(model)

    def attach(self, model) -> None:
        self._model_hooks = [model.register_forward_pre_hook(self._record_mask, with_kwargs=True),
                             model.register_forward_hook(self._forget_mask, always_call=True)]
        for h in self.layers.values():
            h.attach(get_module(model, h.module_name))

    # The gate's statistics should only see real tokens: the model's attention mask is recorded here
    # (and set explicitly by our own passes) so hooks can drop padding from mean and std.
    def _record_mask(self, module, args, kwargs):
        if self.hparams.gate_ignore_padding:
            m = kwargs.get("attention_mask")
            self._mask = m if isinstance(m, torch.Tensor) and m.dim() == 2 else None
        return None

    def _forget_mask(self, module, args, output):
        self._mask = None  # a later call of an inner module alone must not see a stale mask
        return None

    def set_mask(self, mask):
        self._mask = mask if self.hparams.gate_ignore_padding else None

    def set_gate(self, gate: str) -> None:
        """Switch every layer to gate `paper` or `calibrated` (each keeps its own α; no re-editing needed)."""
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        for h in self.layers.values():
            h.gate = gate

    def state_nbytes(self) -> int:
        """Bytes of every state tensor (the hook layers; the shared λ·E[kkᵀ] priors are not part of it)."""
        return sum(h.state_nbytes() for h in self.layers.values())

    def set_mode(self, mode: str, layers: Sequence[int] = None):
        for l in (self.layers if layers is None else layers):
            self.layers[l].mode = mode

    @contextmanager
    def gating(self, gate: Optional[str] = None, mode: Optional[str] = None) -> Iterator["CoachHooKState"]:
        """Within: every layer under this gate and/or mode (None: unchanged); each layer's own are back after."""
        with ExitStack() as stack:
            for h in self.layers.values():
                stack.enter_context(h.gating(gate=gate, mode=mode))
            yield self

    @contextmanager
    def attention_mask(self, mask: Optional[torch.Tensor]) -> Iterator[None]:
        """Within: `mask` is the attention mask the paper gate reads (for a pass that calls inner modules)."""
        self.set_mask(mask)
        try:
            yield
        finally:
            self.set_mask(None)

    def detach(self):
        for h in self.layers.values():
            h.detach()
        for handle in self._model_hooks:
            handle.remove()
        self._model_hooks = []

    def snapshot(self) -> dict:
        """A deep copy of the mutable state (for exact roll-back of a batch)."""
        return {"step": self.step, "alpha_prompts": tuple(self.alpha_prompts),  # tuples of tuples: immutable
                "layers": {l: ({k: t.clone() for k, t in h.state_tensors().items()}, dict(h.extra_state()))
                           for l, h in self.layers.items()}}

    def restore(self, snap: dict) -> None:
        self.newest_batch_token = None
        self.step = snap["step"]
        self.alpha_prompts = list(snap.get("alpha_prompts", ()))
        for l, (tensors, extra) in snap["layers"].items():
            self.layers[l].load_state(tensors, extra)

    def reset(self) -> None:
        self.newest_batch_token = None
        for h in self.layers.values():
            h.alpha_z = float(self.hparams.alpha_z)
            h.clear()
        self.step = 0
        self.alpha_prompts = []


def get_state(model) -> Optional[CoachHooKState]:
    return getattr(model, STATE_ATTR, None)


def remove_coachhook(model) -> None:
    """Detach every hook: the model is the base model again, bit for bit."""
    state = get_state(model)
    if state is not None:
        state.detach()
        delattr(model, STATE_ATTR)


def copy_model(model):
    """A deep copy of the model with its own, independent CoachHooK state (same hook weights, Σkkᵀ, α)."""
    state = get_state(model)
    if state is None:
        return copy_module.deepcopy(model)
    snap = state.snapshot()
    state.detach()  # hooks hold references to the original modules: copy the model without them
    delattr(model, STATE_ATTR)
    try:
        clone = copy_module.deepcopy(model)
    finally:
        state.attach(model)
        object.__setattr__(model, STATE_ATTR, state)
    twin = ensure_state(clone, state.hparams)
    twin.restore(snap)
    twin.context_templates = list(state.context_templates) if state.context_templates else None
    twin.priors = dict(state.priors)
    return clone


def _same_layout(a: CoachHooKHyperParams, b: CoachHooKHyperParams) -> bool:
    return list(a.layers) == list(b.layers) and a.rewrite_module_tmp == b.rewrite_module_tmp


def ensure_state(model, hparams: CoachHooKHyperParams) -> CoachHooKState:
    state = get_state(model)
    if state is not None and not _same_layout(state.hparams, hparams):
        raise ValueError(f"this model already carries CoachHooK hooks on layers {state.hparams.layers} "
                         f"({state.hparams.rewrite_module_tmp}); call coachhook_plugin.remove_coachhook(model) "
                         f"before editing with layers {hparams.layers}")
    if state is None:
        state = CoachHooKState(model, hparams)
        object.__setattr__(model, STATE_ATTR, state)
    state.hparams = hparams
    state.set_gate(hparams.gate)
    return state


# --------------------------------------------------------------------------- context templates
def generate_context_templates(model, tok, seed: int = 0, length: int = 10, per_prefix: int = 1) -> List[str]:
    """MEMIT's templates: "{}" plus short generations from five prefixes (top-k 5 sampling), seeded."""
    templates = ["{}"]
    device = model_device(model)
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        for prefix in MEMIT_TEMPLATE_PREFIXES:
            ids = torch.tensor([tok(prefix)["input_ids"]], device=device)
            for _ in range(per_prefix):
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=5,
                                     max_new_tokens=max(1, length - ids.shape[1]),
                                     pad_token_id=pad_id_of(tok))
                text = tok.decode(out[0], skip_special_tokens=True)
                templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return templates


# --------------------------------------------------------------------------- the batch
# λ·E[kkᵀ] is read once per file and shared by every editor state (copies, several editors of one model): a
# d_in × d_in float64 matrix per layer is the largest thing CoachHooK holds, so it must not be duplicated.
_PRIOR_CACHE: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


def _shared_prior(key, load) -> torch.Tensor:
    t = _PRIOR_CACHE.get(key)
    if t is None:
        t = load()
        _PRIOR_CACHE[key] = t
    return t


def _prior(state: CoachHooKState, model, layer: int) -> torch.Tensor:
    hp = state.hparams
    source = str(path_for(model, hp, hp.rewrite_module_tmp.format(layer))) if hp.mom2_adjustment else "identity"
    if layer not in state.priors or state.prior_sources.get(layer) != source:  # re-read when the hparams moved
        d_in = state.layers[layer].d_in
        if hp.mom2_adjustment:
            path = path_for(model, hp, hp.rewrite_module_tmp.format(layer))
            try:
                st = os.stat(path)
                key = (str(os.path.abspath(path)), st.st_mtime_ns, st.st_size, d_in)
            except OSError:
                key = None  # missing: load_second_moment raises the clear error
            load = lambda: load_second_moment(path, d_in)  # noqa: E731
            state.priors[layer] = _shared_prior(key, load) if key is not None else load()
        else:
            state.priors[layer] = _shared_prior(("identity", d_in), lambda: torch.eye(d_in, dtype=torch.float64))
        state.prior_sources[layer] = source
    return state.priors[layer]


def execute_coachhook(model, tok, requests: Sequence[EditRequest], hparams: CoachHooKHyperParams,
                      state: CoachHooKState, progress=None) -> Dict[str, object]:
    hp = hparams
    layers = list(hp.layers)
    z_block = hp.layer_module_tmp.format(layers[-1])
    if state.context_templates is None:
        state.context_templates = list(hp.context_templates) if hp.context_templates else \
            generate_context_templates(model, tok, seed=hp.context_template_seed)
    templates = state.context_templates
    priors = {l: _prior(state, model, l) for l in layers}  # fail before any work if a file is missing

    info: Dict[str, object] = {}
    # 1. values on the model with the current validated hooks
    # (v_batched: all requests optimised together; false: one request at a time, each a batch of one — MEMIT's
    # loop; the same values up to float rounding, tests/test_values.py)
    state.set_mode(VALIDATED)
    if hp.v_batched:
        V = compute_values(model, tok, requests, hp, z_block, templates, set_mask=state.set_mask,
                           progress=progress)  # (d × n)
    else:
        V = torch.cat([compute_values(model, tok, [r], hp, z_block, templates, set_mask=state.set_mask)
                       for r in (progress(requests, desc="CoachHooK values") if progress else requests)], dim=1)

    # 2.–3. temporary hooks, then layer by layer: keys, residual share, Δ, accumulate, validate
    residual_norms = {}
    with frozen(model), state.gating(mode=TEMPORARY):
        for i, l in enumerate(progress(layers, desc="CoachHooK layers") if progress else layers):
            hook = state.layers[l]
            K, H = compute_keys_and_hidden(model, tok, requests, templates, hook.module_name, z_block,
                                           set_mask=state.set_mask, fact_token=hp.fact_token)
            R = (V - H.to(V.device)) / (len(layers) - i)
            C = accumulated_keys_for(hook, priors[l].to(K.device), K, hp.mom2_update_weight)
            delta = hook_update(R, K, C)
            del C
            hook.add_delta(delta, R)  # low rank or dense, whichever is smaller (HookLayer.layout)
            hook.add_keys(K)
            residual_norms[l] = float(R.norm())
    # Only now validated: while the loop runs, the keys and residual of layer l must see the updates of the
    # layers below it, as MEMIT's do. A validated hook gates with the statistics of the previous batch (none
    # on the first), which need not fire on this batch's tokens; the later layers would then each re-fit the
    # whole residual and the sum overshoot (measured on SmolLM2, 30 CounterFact edits in one batch:
    # reliability 0.88 that way, 1.00 this way, as MEMIT). (`gating` put every layer back to validated.)
    info["residual_norms"] = residual_norms
    info["values"] = V.detach().cpu()

    # 4. the calibrated gate's reference statistics (kept for both gates, so the gate can be switched later)
    info["gate_reference"] = calibrate_gate(model, tok, state)

    # 5. α for each gate in its own statistics. alpha_rule running_min: Eq. 19, α_1 = α_z; α_s = min(α_{s−1}, α_c).
    # recomputed (beyond the paper): min over the stored edit prompts of every batch so far, with this Δ, − margin
    state.step += 1
    state.alpha_prompts.extend(tuple(tok(r.prompt)["input_ids"]) for r in requests)
    by_gate = {}
    if hp.alpha_rule == RECOMPUTED:
        picked = alpha_prompt_sample(len(state.alpha_prompts), len(requests), hp.alpha_prompts_max, seed=state.step)
        info["alpha_prompts"] = len(picked)
    for gate in GATES:
        if hp.alpha_rule == RECOMPUTED:
            cands_g = recompute_alphas(model, tok, state, [state.alpha_prompts[i] for i in picked], gate,
                                       hp.alpha_margin)
        else:
            cands_g = compute_alpha_candidates(model, tok, state, requests, gate=gate)
            for l, h in state.layers.items():
                h.alphas[gate] = alpha_next(h.alphas[gate], cands_g[l], state.step)
        by_gate[gate] = {"alpha_candidates": cands_g, "alpha": {l: h.alphas[gate] for l, h in state.layers.items()}}
    active = hp.gate
    info["alpha_candidates"] = by_gate[active]["alpha_candidates"]
    info["alpha"] = by_gate[active]["alpha"]
    info["by_gate"] = by_gate
    return info


class StaleRestoreError(RuntimeError):
    """A batch's restore handle was called after the hook state changed again; nothing was changed."""


class BatchRestore:
    """Rolls one batch back: the hook state returns exactly to what it was before the batch (for a single-round
    batch: to the base model). A method never changes a base weight, so this is all there is to restore.

    It works while its batch is the newest change to the state, at most once (a second call does nothing).
    Called after the state changed again (a later batch, an undo, a load, a restore), it raises
    StaleRestoreError and changes nothing: rolling back to before its batch would silently drop every later
    batch too. (How EasyEdit calls it is the registry adapter's business: coachhook_plugin.easyedit.registry.)
    """

    def __init__(self, state: CoachHooKState, snapshot: dict, journal_entry: dict):
        self._state, self._snapshot = state, snapshot
        self.restored = False
        self.journal_entry = journal_entry  # this batch's undo-journal entry, dropped when the batch is rolled back
        self.batch_token = object()  # matches state.newest_batch_token while this batch is the newest change
        self.step_after = state.step  # for the error message

    def __call__(self) -> None:
        if self.restored:
            return
        if self._state.newest_batch_token is not self.batch_token:
            raise StaleRestoreError(
                f"this restore handle belongs to the batch that brought the CoachHooK state to step "
                f"{self.step_after}, but the state has changed since (now step {self._state.step}: later batches, "
                f"an undo, a load or a restore); calling it would roll back more than its own batch, so nothing "
                f"was changed. To roll back the newest k batches use coachhook_plugin.undo_coachhook(model, k) "
                f"(keep up to undo_depth batches, set in the hparams), or call each handle right after its batch")
        self.restored = True
        with torch.no_grad():
            self._state.restore(self._snapshot)
        journal = getattr(self._state, "journal", None)
        if journal and journal[-1] is self.journal_entry:
            journal.pop()  # the batch is gone: undo must not count it

    def __repr__(self):
        return f"BatchRestore(step_after={self.step_after}, restored={self.restored})"


def apply_coachhook_to_model(model, tok, requests: List[Dict], hparams: CoachHooKHyperParams, copy: bool = False,
                             return_orig_weights: bool = False, keep_original_weight: bool = False,
                             **kwargs) -> Tuple[torch.nn.Module, BatchRestore]:
    """EasyEdit's apply contract. Repeated calls on one model are consecutive (hook state accumulates)
    unless `hparams.consecutive` is false or EasyEdit asks to keep the original weights (single-round:
    each batch starts from the base model). The batch is all-or-nothing: on any error the state is
    exactly what it was before the call."""
    if not isinstance(hparams, CoachHooKHyperParams):
        raise TypeError(f"hparams must be CoachHooKHyperParams, got {type(hparams).__name__} "
                        f"(alg_name {getattr(hparams, 'alg_name', None)!r})")
    edit_requests = prepare_requests(requests)
    hparams.validate()
    hparams.validate_for_model(model)
    _check_lengths(tok, edit_requests, hparams)
    if copy:
        model = copy_model(model)
    existed = get_state(model) is not None
    old_hparams = get_state(model).hparams if existed else None
    state = ensure_state(model, hparams)
    snap = state.snapshot()
    newest_before = state.newest_batch_token
    if not hparams.consecutive or keep_original_weight:
        state.reset()  # single-round: every batch starts from the base model ...
    restore_point = state.snapshot()  # ... and a restore returns there
    progress = kwargs.get("progress", _default_progress)
    try:
        info = execute_coachhook(model, tok, edit_requests, hparams, state, progress=progress)
    except BaseException:
        state.restore(snap)
        state.newest_batch_token = newest_before  # the state is what the previous batch left: its handle stays valid
        if not existed:
            remove_coachhook(model)
        else:
            state.hparams = old_hparams  # the failed call's hparams (gate settings …) do not stay either
        raise
    state.last_info = info
    state.journal.append(snap)  # undo journal: the state from before this batch, at most undo_depth kept
    del state.journal[:max(0, len(state.journal) - int(hparams.undo_depth))]
    handle = BatchRestore(state, restore_point, journal_entry=snap)
    state.newest_batch_token = handle.batch_token
    return model, handle


def _default_progress(it, desc=""):
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False)


def _check_lengths(tok, requests: Sequence[EditRequest], hparams) -> None:
    for i, r in enumerate(requests):
        n = len(tok(r.prompt)["input_ids"])
        if n > hparams.max_length:
            raise ValueError(f"request {i}: prompt is {n} tokens, longer than max_length={hparams.max_length}; "
                             f"shorten it or raise max_length in the hparams")
