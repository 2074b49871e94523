"""The hook layer (a copy W_h of a down-projection, paper Eq. 16) and its state.

W_h is kept as W_0 + Δ: the base weight W_0 is never touched, W_h k and W_0 k differ by exactly Δk (no
cancellation error in M = ‖W_h k − W_0 k‖), and the hook's output is the module's own output plus Δk where
the gate says so, cast to the model's dtype. Masters are float32 whatever the model's dtype.

Representation (bounded for any number of edits, small in the common case; `layout` decides, and it is the
only place that does — allocation, `state_bytes` and profiling all go through it):
  Δ  low rank  Δ = U Vᵀ, U (d_out × r) with orthonormal columns, V (d_in × r), while
               r·(d_out + d_in) < d_out·d_in; each batch adds rank ≤ its number of edits;
               then dense (d_out × d_in). With U orthonormal, M = ‖Δk‖ = ‖Vᵀk‖: the gate costs r·d_in
               per token, and U is applied only to the tokens that are swapped.
  Σkkᵀ keys    the accumulated keys themselves (d_in × n) while n < d_in, then their Gram (d_in × d_in),
               float32 (exact for keys from float32/16 models; C_accu itself is formed and solved in float64).
The largest state is therefore the reference implementation's dense one (a d_in² C_accu and a d_out × d_in
copy, float32), reached only after d_in edits.

Modes (`mode`: temporary, validated) and gates (`gate`: paper, calibrated), and the gate's equations
(Eq. 17–19), are in `gate.py`; this layer calls them from its forward hook. Passes that need another
gate or mode, or record what the gate sees, use the context managers `gating`, `calibrating`,
`recording_max_z` and `recomputing_alpha`, which put everything back when they end.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from .gate import (CALIBRATED, DEFAULT_CALIBRATION_PROMPTS, GATES, PAPER, TEMPORARY, VALIDATED,  # noqa: F401
                   add_swapped, alpha_recomputed, calibrated_zscores, deviation_norms, gathers_swapped_rows,
                   near_edited_keys, paper_zscores, reference_stats, sequence_max_z, swapped_tokens)
from .models import weight_out_in

# relative size below which a new direction of a batch's residuals is taken as already spanned
_RANK_TOL = 1e-10


class HookLayer(torch.nn.Module):
    """Hook state of one edited down-projection: Δ = W_h − W_0, accumulated keys, α per gate, gate statistics."""

    def __init__(self, module_name: str, module: torch.nn.Module, alpha_z: float, gate: str = PAPER,
                 key_scope_cosine: Optional[float] = None):
        super().__init__()
        w0 = weight_out_in(module)
        self.module_name = module_name
        self.d_out, self.d_in = int(w0.shape[0]), int(w0.shape[1])
        self.device = w0.device
        self.alpha_z = float(alpha_z)
        self.handle = None
        self.mask_source = None  # callable returning the (B, T_total) attention mask of the running forward
        # Set only inside the context managers below (`recording_max_z`, `calibrating`); tests also set them.
        self.observed_max_z: Optional[List[torch.Tensor]] = None  # a list: record per-sequence max z
        self._decisions: Optional[List[Dict[str, torch.Tensor]]] = None  # recording_decisions()
        self.calibration_mask = None  # (B, T) bool, or True for no padding: this pass measures μ, σ of M
        self.alpha_margin: Optional[float] = None  # a number: this pass sets α from its own z (`recomputing_alpha`)
        self.recomputed_max_z: Optional[List[torch.Tensor]] = None  # what that pass saw, per sequence
        self.gate = gate
        # beyond the paper (hparams key_scope_cosine): a token the gate swaps must also have a key with at least
        # this cosine to one of the layer's edited keys (kept as unit columns); None: the gate alone decides
        self.key_scope_cosine = None if key_scope_cosine is None else float(key_scope_cosine)
        self.clear()

    # ---------------------------------------------------------------- representation
    def layout(self, num_keys: int, rank: int) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
        """Shapes and dtypes of every state tensor for `num_keys` accumulated keys and a Δ of rank `rank`.

        The one place that chooses the representation: low-rank Δ while r(d_out + d_in) < d_out·d_in, dense
        after; keys while n < d_in, their Gram after. Allocation (`_set_delta`, `add_keys`) follows it."""
        d_out, d_in = self.d_out, self.d_in
        out: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}
        rank = min(int(rank), d_out, d_in)
        if rank * (d_out + d_in) < d_out * d_in:
            out["delta_u"] = ((d_out, rank), torch.float32)
            out["delta_v"] = ((d_in, rank), torch.float32)
        else:
            out["delta"] = ((d_out, d_in), torch.float32)
        if int(num_keys) < d_in:
            out["keys"] = ((d_in, int(num_keys)), torch.float32)
        else:
            out["key_gram"] = ((d_in, d_in), torch.float32)
        if self.key_scope_cosine is not None:  # the key scope needs every key itself, however many
            out["unit_keys"] = ((d_in, int(num_keys)), torch.float32)
        return out

    def layout_nbytes(self, num_keys: int, rank: int) -> int:
        return sum(math.prod(shape) * torch.empty((), dtype=dt).element_size()
                   for shape, dt in self.layout(num_keys, rank).values())

    @property
    def rank(self) -> int:
        """Rank of Δ as represented (columns of U; min(d_out, d_in) once dense)."""
        return self._u.shape[1] if self._dense is None else min(self.d_out, self.d_in)

    @property
    def is_dense(self) -> bool:
        return self._dense is not None

    def clear(self) -> None:
        """The unedited state: Δ = 0, no keys, α = α_z for both gates, no gate statistics."""
        lay = self.layout(0, 0)
        self._u = torch.zeros(lay["delta_u"][0], dtype=torch.float32, device=self.device)
        self._v = torch.zeros(lay["delta_v"][0], dtype=torch.float32, device=self.device)
        self._dense = None
        self._keys = torch.zeros(lay["keys"][0], dtype=torch.float32, device=self.device)
        self._gram = None
        self._unit_keys = (torch.zeros(lay["unit_keys"][0], dtype=torch.float32, device=self.device)
                           if "unit_keys" in lay else None)
        self.alphas = {g: self.alpha_z for g in GATES}
        self.num_keys = 0
        self.mode = VALIDATED
        self.ref_mean: Optional[float] = None
        self.ref_std: Optional[float] = None
        self.ref_count = 0

    @property
    def alpha(self) -> float:
        """α of the active gate."""
        return self.alphas[self.gate]

    @alpha.setter
    def alpha(self, value: float) -> None:
        self.alphas[self.gate] = float(value)

    @property
    def delta(self) -> torch.Tensor:
        """Δ = W_h − W_0 as a dense float32 (d_out × d_in) tensor (materialised; for inspection and tests)."""
        if self._dense is not None:
            return self._dense
        return (self._u.double() @ self._v.double().t()).float()

    @property
    def key_gram(self) -> torch.Tensor:
        """Σ of all earlier batches' K Kᵀ (Eq. 14's K'K'ᵀ) as a dense float64 (d_in × d_in) tensor."""
        if self._gram is not None:
            return self._gram.double()
        k = self._keys.double()
        return k @ k.t()

    def add_gram_to(self, c: torch.Tensor) -> torch.Tensor:
        """c += Σ earlier K'K'ᵀ in place (c float64, d_in × d_in), without materialising the Gram twice."""
        if self._gram is not None:
            return c.add_(self._gram.to(c.device, c.dtype))
        if self._keys.shape[1]:
            k = self._keys.to(c.device, c.dtype)
            c.addmm_(k, k.t())
        return c

    def set_delta_dense(self, delta: torch.Tensor) -> None:
        """Replace Δ by a given dense matrix (tests, conversions); kept dense."""
        self._dense = delta.detach().to(self.device, torch.float32).clone()
        self._u = self._v = None

    def add_keys(self, keys: torch.Tensor) -> None:
        """Σkkᵀ += K Kᵀ for a batch's keys K (d_in × n)."""
        k = keys.detach().to(self.device, torch.float32)
        n_new = self.num_keys + k.shape[1]
        if self._unit_keys is not None:
            unit = k / k.norm(dim=0, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            self._unit_keys = torch.cat([self._unit_keys, unit], dim=1)
        lay = self.layout(n_new, self.rank)
        if "keys" in lay:
            self._keys = torch.cat([self._keys, k], dim=1)
        else:
            if self._gram is None:  # switch: the Gram of everything so far, summed in float64
                allk = torch.cat([self._keys, k], dim=1).double()
                self._gram = (allk @ allk.t()).float()
                self._keys = None
            else:
                k64 = k.double()
                self._gram = (self._gram.double() + k64 @ k64.t()).float()
        self.num_keys = n_new

    def add_delta(self, delta_b: torch.Tensor, residual: torch.Tensor) -> None:
        """Δ += Δ_b for a batch's update Δ_b = R Pᵀ (dense, d_out × d_in), whose columns lie in span(R).

        Low rank: Δ_b = W Gᵀ with W an orthonormal basis of span(R) and G = Δ_bᵀW; W's part outside span(U)
        becomes new columns of U (rank-revealing, twice-orthogonalised in float64), V is updated to match.
        Switches to dense once that is smaller (`layout`)."""
        d = delta_b.detach().to(self.device, torch.float64)
        if self._dense is not None:
            self._dense = (self._dense.double() + d).float()
            return
        r = residual.detach().to(self.device, torch.float64)
        w = _orth(r)  # (d_out × s)
        g = d.t() @ w  # (d_in × s): Δ_b = W Gᵀ
        u, v = self._u.double(), self._v.double()
        c1 = u.t() @ w
        w1 = w - u @ c1
        c2 = u.t() @ w1  # second pass: orthogonal to U to working precision
        w1 = w1 - u @ c2
        coef = c1 + c2  # W = U coef + W1
        if w1.shape[1]:
            uu, ss, vh = torch.linalg.svd(w1, full_matrices=False)
            if w1.is_meta:  # shape-only run (profiling.state_bytes_table): every new direction is new
                q2, s2 = uu, ss[:, None] * vh
            else:
                keep = ss > _RANK_TOL * max(1.0, float(ss.max()) if ss.numel() else 0.0)
                q2 = uu[:, keep]
                s2 = ss[keep, None] * vh[keep]  # W1 = Q2 S2
        else:
            q2 = w1
            s2 = w1.new_zeros(0, w.shape[1])
        new_v = v + g @ coef.t()
        add_v = g @ s2.t()
        rank = u.shape[1] + q2.shape[1]
        if "delta" in self.layout(self.num_keys, rank):
            self._dense = (u @ new_v.t() + q2 @ add_v.t()).float()
            self._u = self._v = None
        else:
            self._u = torch.cat([self._u, q2.float()], dim=1)
            self._v = torch.cat([new_v, add_v], dim=1).float()

    # ---------------------------------------------------------------- state (for save/load, undo)
    # The contract persistence relies on: `state_tensors()` are every tensor of the layer's state (saved with
    # safetensors), `extra_state()` everything else as JSON-able values; `load_state` puts both back exactly.
    # Shapes vary with the number of edits (and the names with the representation): load assigns clones.
    def state_tensors(self) -> Dict[str, torch.Tensor]:
        out = {}
        if self._dense is not None:
            out["delta"] = self._dense
        else:
            out["delta_u"], out["delta_v"] = self._u, self._v
        if self._gram is not None:
            out["key_gram"] = self._gram
        else:
            out["keys"] = self._keys
        if self._unit_keys is not None:
            out["unit_keys"] = self._unit_keys
        return out

    def extra_state(self) -> Dict[str, Any]:
        return {"alpha": float(self.alpha), "alphas": {g: float(a) for g, a in self.alphas.items()},
                "gate": self.gate, "num_keys": int(self.num_keys), "mode": self.mode,
                "ref_mean": self.ref_mean, "ref_std": self.ref_std, "ref_count": int(self.ref_count)}

    def load_state(self, tensors: Dict[str, torch.Tensor], extra: Dict[str, Any]) -> None:
        def take(name):
            t = tensors[name]
            if t.dtype != torch.float32 or t.dim() != 2:
                t = t.float()
            return t.detach().to(self.device).clone()

        if "delta" in tensors:
            self._dense, self._u, self._v = take("delta"), None, None
            if tuple(self._dense.shape) != (self.d_out, self.d_in):
                raise ValueError(f"{self.module_name}: Δ of shape {tuple(self._dense.shape)}, expected "
                                 f"{(self.d_out, self.d_in)}")
        else:
            self._dense, self._u, self._v = None, take("delta_u"), take("delta_v")
            if self._u.shape[0] != self.d_out or self._v.shape[0] != self.d_in or self._u.shape[1] != self._v.shape[1]:
                raise ValueError(f"{self.module_name}: low-rank Δ factors of shapes {tuple(self._u.shape)}, "
                                 f"{tuple(self._v.shape)} do not fit a {self.d_in} → {self.d_out} projection")
        if "key_gram" in tensors:
            self._gram, self._keys = take("key_gram"), None
        else:
            self._gram, self._keys = None, take("keys")
        if self.key_scope_cosine is not None:
            if "unit_keys" not in tensors:
                raise ValueError(f"{self.module_name}: this state was written without key_scope_cosine, so its edited "
                                 f"keys were not kept; load it with key_scope_cosine: null (the hparams it was "
                                 f"written with), or re-apply the edits with the key scope on")
            self._unit_keys = take("unit_keys")
        self.num_keys, self.mode = int(extra["num_keys"]), extra["mode"]
        self.gate = extra.get("gate", self.gate)
        alphas = extra.get("alphas")
        self.alphas = {g: float(a) for g, a in alphas.items()} if alphas else {g: float(extra["alpha"]) for g in GATES}
        self.alphas[self.gate] = float(extra["alpha"])
        self.ref_mean, self.ref_std = extra.get("ref_mean"), extra.get("ref_std")
        self.ref_count = int(extra.get("ref_count", 0))

    def state_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())

    # ---------------------------------------------------------------- gate passes (set, then put back)
    @contextmanager
    def gating(self, gate: Optional[str] = None, mode: Optional[str] = None) -> Iterator["HookLayer"]:
        """Within: this gate and/or mode (None: unchanged); the previous ones are back afterwards."""
        saved = self.gate, self.mode
        if gate is not None:
            self.gate = gate
        if mode is not None:
            self.mode = mode
        try:
            yield self
        finally:
            self.gate, self.mode = saved

    @contextmanager
    def recording_decisions(self) -> Iterator[List[Dict[str, torch.Tensor]]]:
        """Within: every gated forward call appends what the gate saw and decided, {"m": ‖Δk‖, "z", "swap"} (CPU
        tensors shaped like the call's tokens), to the yielded list: for analysing an edited model's scope."""
        self._decisions = []
        try:
            yield self._decisions
        finally:
            self._decisions = None

    @contextmanager
    def recording_max_z(self) -> Iterator[List[torch.Tensor]]:
        """Within: every forward call appends each sequence's max z (under the active gate) to the yielded list."""
        self.observed_max_z = []
        try:
            yield self.observed_max_z
        finally:
            self.observed_max_z = None

    @contextmanager
    def calibrating(self, mask) -> Iterator["HookLayer"]:
        """Within: validated under the calibrated gate, and each forward call replaces μ, σ (and their count) of
        M over the real tokens (`mask` (B, T) bool, or True: no padding). The previous statistics are dropped
        first: a call with no real tokens leaves none, so the gate never fires."""
        self.ref_mean, self.ref_std, self.ref_count = None, None, 0
        self.calibration_mask = mask
        try:
            with self.gating(gate=CALIBRATED, mode=VALIDATED):
                yield self
        finally:
            self.calibration_mask = None

    @contextmanager
    def recomputing_alpha(self, margin: float) -> Iterator[List[torch.Tensor]]:
        """Within (alpha_rule `recomputed`, one forward call of the stored edit prompts): the call first sets α of
        the active gate to `gate.alpha_recomputed` of its sequences' max z over real tokens (unchanged when none is
        finite), then swaps with it. Hooks run in layer order, so each layer's α is taken on the keys its lower
        layers give under their new α: the same call run again swaps exactly as it does here, and every prompt in
        it fires at every layer. The yielded list receives the per-sequence max z."""
        self.alpha_margin, self.recomputed_max_z = float(margin), []
        try:
            yield self.recomputed_max_z
        finally:
            self.alpha_margin, self.recomputed_max_z = None, None

    def zscores(self, m: torch.Tensor) -> torch.Tensor:
        """z of M (B, T) under the active gate: Eq. 18 over each sequence's real tokens, or against μ, σ."""
        if self.gate == PAPER:
            return paper_zscores(m, self._token_mask(m.shape[0], m.shape[1], m.device))
        return calibrated_zscores(m, self.ref_mean, self.ref_std)

    # ---------------------------------------------------------------- attach
    def attach(self, module: torch.nn.Module) -> None:
        if self.handle is None:
            self.handle = module.register_forward_hook(self._forward_hook)

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def hook_weight(self, module: torch.nn.Module) -> torch.Tensor:
        """W_h in (out, in) orientation, float32."""
        return weight_out_in(module).detach().float() + self.delta.to(module.weight.device)

    # ---------------------------------------------------------------- forward
    def _token_mask(self, batch: int, tokens: int, device) -> Optional[torch.Tensor]:
        """Real-token mask for the tokens of this call (the last `tokens` columns of the model's mask)."""
        if self.mask_source is None:
            return None
        mask = self.mask_source()
        if mask is None or mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < tokens:
            return None
        return mask[:, -tokens:].to(device=device, dtype=torch.bool)

    def _factors(self, device):
        if self._dense is not None:
            if self._dense.device != device:
                self._dense = self._dense.to(device)
                self.device = device
            return None, self._dense
        if self._u.device != device:
            self._u, self._v = self._u.to(device), self._v.to(device)
            if self._keys is not None:
                self._keys = self._keys.to(device)
            if self._gram is not None:
                self._gram = self._gram.to(device)
            if self._unit_keys is not None:
                self._unit_keys = self._unit_keys.to(device)
            self.device = device
        return self._u, self._v

    def _forward_hook(self, module, inputs, output):
        """The module's output plus Δk: on every token (temporary), or on the tokens the gate swaps (validated)."""
        if self.num_keys == 0 and self.mode == VALIDATED:
            return output  # nothing edited at this layer yet: W_h = W_0
        k = inputs[0]
        k2 = (k if k.dtype == torch.float32 else k.float()).reshape(-1, k.shape[-1])
        u, v = self._factors(k.device)
        y = k2 @ v.t() if u is None else k2 @ v  # Δk (dense), or Vᵀk (low rank: Δk = U y, ‖Δk‖ = ‖y‖)
        out2 = output.reshape(-1, output.shape[-1])
        if self.mode == TEMPORARY:
            full = y if u is None else y @ u.t()
            return (out2 + full.to(output.dtype)).reshape(output.shape)
        m = deviation_norms(y, k.shape)
        if self.calibration_mask is not None:
            cmask = None if self.calibration_mask is True else self.calibration_mask.to(m.device, torch.bool)
            self.ref_mean, self.ref_std, self.ref_count = reference_stats(m, cmask)
        z = self.zscores(m)
        if self.observed_max_z is not None:
            self.observed_max_z.append(z.max(dim=1).values.detach().cpu())
        if self.alpha_margin is not None:
            max_z = sequence_max_z(z, self._token_mask(z.shape[0], z.shape[1], z.device)).detach().cpu()
            self.recomputed_max_z.append(max_z)
            alpha = alpha_recomputed(max_z, self.alpha_margin)
            if math.isfinite(alpha):
                self.alpha = alpha
        swap = swapped_tokens(z, self.alpha)
        if self.key_scope_cosine is not None:
            swap = self._within_key_scope(k2, swap)
        if self._decisions is not None:
            self._decisions.append({"z": z.detach().cpu(), "swap": swap.detach().cpu(), "m": m.detach().cpu()})
        out2 = add_swapped(out2, y, u, swap.reshape(-1), gather=gathers_swapped_rows(y.device.type))
        return out2.reshape(output.shape)

    def _within_key_scope(self, keys: torch.Tensor, swap: torch.Tensor) -> torch.Tensor:
        """The gate's decision `swap` (B, T), narrowed to tokens whose key (rows of `keys`) is near an edited key
        (`gate.near_edited_keys`); on the CPU only the swapped tokens are compared (as in `add_swapped`)."""
        if self._unit_keys.device != keys.device:
            self._unit_keys = self._unit_keys.to(keys.device)
        flat = swap.reshape(-1)
        if gathers_swapped_rows(keys.device.type):
            idx = flat.nonzero().squeeze(1)
            if idx.numel() == 0:
                return swap
            flat = flat.clone()
            flat[idx] = near_edited_keys(keys.index_select(0, idx), self._unit_keys, self.key_scope_cosine)
        else:
            flat = flat & near_edited_keys(keys, self._unit_keys, self.key_scope_cosine)
        return flat.reshape(swap.shape)


def _orth(r: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of span(r) (d × s, s ≤ columns of r), rank-revealing; r float64."""
    if r.shape[1] == 0:
        return r
    uu, ss, _ = torch.linalg.svd(r, full_matrices=False)
    if r.is_meta:
        return uu
    if ss.numel() == 0 or float(ss.max()) == 0.0:
        return r[:, :0]
    keep = ss > _RANK_TOL * float(ss.max())
    return uu[:, keep]
