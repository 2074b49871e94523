"""The gate (paper Eq. 17–19, and a calibrated gate): which tokens take the hook layer's output, and α.

One equation per function, all pure (tensors in, tensors or numbers out); `hook.HookLayer` holds the state
(Δ, α per gate, μ and σ) and calls them from its forward hook:

  Eq. 17  M_t = ‖O_t − P_t‖ = ‖Δk_t‖                                  `deviation_norms`
  Eq. 18  z_t = (M_t − mean M) / std M over the sequence's tokens      `paper_zscores`
          (calibrated gate: against μ, σ of unedited prompts)          `calibrated_zscores`, `reference_stats`
          token t swaps where z_t ≥ α                                  `swapped_tokens`, applied by `add_swapped`
  Eq. 19  α_1 = α_z;  α_s = min(α_{s−1}, α_c),  α_c = min over the batch's edit prompts of their max z
                                                                       `alpha_candidate`, `alpha_next`
  beyond the paper (alpha_rule `recomputed`, replaces Eq. 19): after every batch, with the current Δ,
          α_s = min over the stored edit prompts of all batches so far of their max z, minus a margin
                                                                       `sequence_max_z`, `alpha_recomputed`,
                                                                       `alpha_prompt_sample`

Modes:
  temporary  every token takes W_h's output (used while a batch is being written, paper Sec. 3.2)
  validated  a token takes W_h's output only where its gate fires (z ≥ α)
Gates (one α per gate and layer, both kept up to date so the gate can be switched on an edited model):
  paper       z of M_t standardised over the tokens of its own sequence in the current forward call (Eq. 18)
  calibrated  z_t = (M_t − μ) / σ with μ, σ the mean and standard deviation of M over the real tokens of a
              fixed set of unedited calibration prompts, measured after every batch. Each token's decision
              depends on its own key only: independent of sequence length, batch composition, padding and
              the KV cache (one-token calls during cached generation gate exactly as the full sequence does).
"""
from __future__ import annotations

import math
import random
from typing import List, Optional, Tuple

import torch

TEMPORARY = "temporary"
VALIDATED = "validated"
PAPER = "paper"
CALIBRATED = "calibrated"
GATES = (PAPER, CALIBRATED)
# How α moves from batch to batch: Eq. 19 (a running minimum: α can only fall, the scope only widen), or
# recomputed after every batch over the edit prompts of every batch so far (it can rise again)
RUNNING_MIN = "running_min"
RECOMPUTED = "recomputed"
ALPHA_RULES = (RUNNING_MIN, RECOMPUTED)


def paper_zscores(m: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """z = (M − mean_t M) / std_t M per sequence (Eq. 18's standardisation, unbiased std).

    m: (B, T) norms; mask: (B, T) bool of real tokens (None: all real). Tokens outside the mask, and
    sequences where σ is 0 or undefined (fewer than two real tokens), get z = -inf: never swapped.
    """
    m = m.float()
    if mask is None:
        mask = torch.ones_like(m, dtype=torch.bool)
    n = mask.sum(dim=1, keepdim=True)
    mz = torch.where(mask, m, torch.zeros_like(m))
    mean = mz.sum(dim=1, keepdim=True) / n.clamp(min=1)
    var = (torch.where(mask, m - mean, torch.zeros_like(m)) ** 2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)
    std = var.sqrt()
    ok = (n >= 2) & (std > 0)
    z = (m - mean) / torch.where(ok, std, torch.ones_like(std))
    return torch.where(ok & mask, z, torch.full_like(z, float("-inf")))


def calibrated_zscores(m: torch.Tensor, mean: Optional[float], std: Optional[float]) -> torch.Tensor:
    """z = (M − μ) / σ against reference statistics; -inf everywhere (never swapped) when there are none or σ = 0."""
    m = m.float()
    if mean is None or std is None or not std > 0 or not math.isfinite(std) or not math.isfinite(mean):
        return torch.full_like(m, float("-inf"))
    return (m - mean) / std


def reference_stats(m: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Tuple[Optional[float], Optional[float], int]:
    """(mean, unbiased std, count) of M over the real tokens; (None, None, n) with fewer than two tokens."""
    vals = m.float().reshape(-1) if mask is None else m.float()[mask.bool()]
    vals = vals.double()
    n = int(vals.numel())
    if n < 2:
        return None, None, n
    return float(vals.mean()), float(vals.std(unbiased=True)), n


def deviation_norms(y: torch.Tensor, key_shape: torch.Size) -> torch.Tensor:
    """Eq. 17: M_t = ‖O_t − P_t‖ = ‖Δk_t‖ per token, shaped (B, T) (an un-batched (T, d) input gives (1, T)).

    y: the flattened (N, ·) rows of Δk, or of Vᵀk for a low-rank Δ = U Vᵀ (U orthonormal: same norm)."""
    m = y.norm(dim=-1)
    return m.reshape(-1, key_shape[-2]) if len(key_shape) >= 2 else m.reshape(1, -1)


def swapped_tokens(z: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 18's test: token t takes the hook layer's output where z_t ≥ α (-inf never does)."""
    return z >= alpha


def alpha_candidate(max_z: torch.Tensor) -> float:
    """Eq. 19's α_c: the smallest per-prompt max z over the batch's edit prompts (non-finite z — σ = 0, a single
    token — is ignored, never NaN); inf when no prompt gives one."""
    finite = max_z[torch.isfinite(max_z)]
    return float(finite.min()) if finite.numel() else math.inf


def alpha_next(prev: float, candidate: float, step: int) -> float:
    """Eq. 19: α_1 = α_z; α_s = min(α_{s−1}, α_c) after batch s > 1 (an infinite α_c leaves α as it was)."""
    return min(prev, candidate) if step > 1 and math.isfinite(candidate) else prev


def sequence_max_z(z: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each sequence's max z over its real tokens (z (B, T), mask (B, T) bool or None: all real); -inf where a
    sequence has none. Pad tokens are left out: under the calibrated gate their z is finite and could be the max."""
    if mask is not None:
        z = z.masked_fill(~mask.to(device=z.device, dtype=torch.bool), float("-inf"))
    return z.max(dim=1).values


def alpha_recomputed(max_z: torch.Tensor, margin: float) -> float:
    """alpha_rule `recomputed` (beyond the paper; replaces Eq. 19): α = min over the stored edit prompts (every
    batch so far, or a sample: `alpha_prompt_sample`) of each prompt's max z under the current Δ, minus `margin`:
    the highest threshold at which every one of them still fires (margin 0), or fires with `margin` to spare.
    Non-finite z is ignored as in `alpha_candidate`; inf (keep α as it was) when no prompt gives one."""
    return alpha_candidate(max_z) - float(margin)


def alpha_prompt_sample(num_stored: int, num_new: int, cap: Optional[int], seed: int) -> List[int]:
    """Which stored edit prompts (indices, oldest first; the newest `num_new` are this batch's) the recomputed α
    is taken over: all of them while there are at most `cap` (None: no cap); else the newest ⌈cap/2⌉ — at least
    the whole batch — and a sample, drawn with `seed`, of the older ones for the rest. A new seed every batch
    (the step) lets every old edit be checked again from time to time at a bounded cost per batch."""
    if cap is None or num_stored <= cap:
        return list(range(num_stored))
    recent = min(num_stored, max(num_new, (cap + 1) // 2))
    older = num_stored - recent
    picked = sorted(random.Random(seed).sample(range(older), min(older, max(0, cap - recent))))
    return picked + list(range(older, num_stored))


def near_edited_keys(keys: torch.Tensor, unit_keys: torch.Tensor, cosine: float) -> torch.Tensor:
    """hparams `key_scope_cosine` (beyond the paper): whether each key (rows of `keys`, N × d_in) has cosine ≥
    `cosine` with at least one edited key of the layer (the unit columns of `unit_keys`, d_in × n); (N,) bool.
    No edited key: nothing is near."""
    if unit_keys.shape[1] == 0:
        return torch.zeros(keys.shape[0], dtype=torch.bool, device=keys.device)
    unit = keys / keys.norm(dim=1, keepdim=True).clamp_min(torch.finfo(keys.dtype).tiny)
    return (unit @ unit_keys.to(keys.dtype)).max(dim=1).values >= cosine


def gathers_swapped_rows(device_type: str) -> bool:
    """Which way `add_swapped` adds U y: gather the swapped rows (CPU: the host sync that finds them is free, and
    only they pay for U), or mask every row (accelerators: no data-dependent shapes, no device sync)."""
    return device_type == "cpu"


def add_swapped(out: torch.Tensor, y: torch.Tensor, u: Optional[torch.Tensor], swap: torch.Tensor,
                gather: bool) -> torch.Tensor:
    """out + Δk on the swapped rows only. out (N, d_out); y (N, ·) = Δk (u None, dense Δ) or Vᵀk (Δk = U y);
    swap (N,) bool. `gather` picks the implementation (`gathers_swapped_rows`); both give the same sums."""
    if u is None:
        return out + torch.where(swap[:, None], y, torch.zeros_like(y)).to(out.dtype)
    if gather:
        idx = swap.nonzero().squeeze(1)
        if idx.numel() == 0:
            return out
        return out.index_add(0, idx, (y.index_select(0, idx) @ u.t()).to(out.dtype))
    return out + ((y * swap[:, None].to(y.dtype)) @ u.t()).to(out.dtype)


# Unedited text for the calibrated gate's reference statistics: plain sentences about everyday topics, no named
# entities that an edit is likely to touch. ~30 short prompts (a few hundred tokens): one batched forward pass.
DEFAULT_CALIBRATION_PROMPTS = (
    "The weather was cold this morning, so I wore a warm coat.",
    "She opened the window to let some fresh air into the room.",
    "Most children learn to read and write at school.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "He missed the bus and had to walk all the way home.",
    "A good night's sleep helps the body recover from a long day.",
    "The river flows slowly through the valley towards the sea.",
    "We planted tomatoes and beans in the garden last spring.",
    "The meeting was moved to Thursday afternoon because of the holiday.",
    "Water boils at a lower temperature at high altitude.",
    "The old bridge was repaired after the storm damaged it.",
    "Many people enjoy a cup of coffee in the morning.",
    "The library is quiet in the evening, when most students have left.",
    "Prices went up again this year, and families spend more on food.",
    "The dog waited patiently by the door for its owner.",
    "In the autumn the leaves turn yellow and red before they fall.",
    "The train was delayed by twenty minutes due to a signal problem.",
    "Exercise and a balanced diet are important for good health.",
    "The museum has a large collection of paintings and old maps.",
    "They decided to paint the kitchen a lighter colour.",
    "A small shop on the corner sells bread, milk and newspapers.",
    "The teacher asked the students to hand in their homework on Monday.",
    "Heavy rain caused flooding in several low-lying streets.",
    "The company plans to hire more staff next year.",
    "My neighbour plays the piano every evening after dinner.",
    "The mountains were covered in snow for most of the winter.",
    "It is a long way from the station to the centre of the town.",
    "The computer restarted after installing the latest updates.",
    "Farmers harvest wheat at the end of the summer.",
    "The film was longer than expected, but the ending was good.",
    "Fresh fruit and vegetables are sold at the market on Saturdays.",
    "The hotel room had a small balcony with a view of the harbour.",
)
