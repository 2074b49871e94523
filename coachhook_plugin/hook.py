"""The hook layer (a copy W_h of a down-projection) and its gate (paper Eq. 16–18).

W_h is kept as W_0 + Δ with Δ a float32 master copy: the base weight W_0 is never touched, W_h k and
W_0 k differ by exactly Δk (no cancellation error in M = ‖W_h k − W_0 k‖, no fp16 drift of W_h), and
the hook's output is the module's own output plus Δk where the gate says so.

Modes:
  temporary  every token takes W_h's output (used while a batch is being written, paper Sec. 3.2)
  validated  a token takes W_h's output only where its z-score of M over its sequence is ≥ α (Eq. 18)
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from .models import weight_out_in

TEMPORARY = "temporary"
VALIDATED = "validated"


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


class HookLayer(torch.nn.Module):
    """Hook state of one edited down-projection: Δ = W_h − W_0, accumulated keys Σkkᵀ and α."""

    def __init__(self, module_name: str, module: torch.nn.Module, alpha_z: float):
        super().__init__()
        w0 = weight_out_in(module)
        d_out, d_in = w0.shape
        self.module_name = module_name
        self.register_buffer("delta", torch.zeros(d_out, d_in, dtype=torch.float32, device=w0.device))
        # Σ of all earlier batches' K Kᵀ (Eq. 14's K'K'ᵀ), float64 because it enters a solve
        self.register_buffer("key_gram", torch.zeros(d_in, d_in, dtype=torch.float64, device=w0.device))
        self.alpha = float(alpha_z)
        self.mode = VALIDATED
        self.num_keys = 0
        self.handle = None
        self.mask_source = None  # callable returning the (B, T_total) attention mask of the running forward
        self.observed_max_z: Optional[List[torch.Tensor]] = None  # set to [] to record per-sequence max z

    @property
    def d_out(self) -> int:
        return self.delta.shape[0]

    @property
    def d_in(self) -> int:
        return self.delta.shape[1]

    # ---------------------------------------------------------------- state (for save/load, undo)
    # The contract persistence relies on: `state_tensors()` are every tensor of the layer's state (saved with
    # safetensors), `extra_state()` everything else as JSON-able values; `load_state` puts both back exactly.
    def state_tensors(self) -> Dict[str, torch.Tensor]:
        return {"delta": self.delta, "key_gram": self.key_gram}

    def extra_state(self) -> Dict[str, Any]:
        return {"alpha": float(self.alpha), "num_keys": int(self.num_keys), "mode": self.mode}

    def load_state(self, tensors: Dict[str, torch.Tensor], extra: Dict[str, Any]) -> None:
        with torch.no_grad():
            for name, t in tensors.items():
                getattr(self, name).copy_(t)
        self.alpha, self.num_keys, self.mode = float(extra["alpha"]), int(extra["num_keys"]), extra["mode"]

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

    def _forward_hook(self, module, inputs, output):
        if self.num_keys == 0 and self.mode == VALIDATED:
            return output  # nothing edited at this layer yet: W_h = W_0
        k = inputs[0]
        delta = self.delta if self.delta.device == k.device else self.delta.to(k.device)
        diff = k.float() @ delta.t()  # (…, d_out) = W_h k − W_0 k
        if self.mode == TEMPORARY:
            return output + diff.to(output.dtype)
        squeeze = diff.dim() == 2  # un-batched input (T, d)
        d3 = diff.unsqueeze(0) if squeeze else diff
        m = d3.norm(dim=-1)  # Eq. 17: M_t = ‖O_t − P_t‖
        mask = self._token_mask(m.shape[0], m.shape[1], m.device)
        z = paper_zscores(m, mask)
        if self.observed_max_z is not None:
            self.observed_max_z.append(z.max(dim=1).values.detach().cpu())
        swap = (z >= self.alpha).unsqueeze(-1)  # Eq. 18
        gated = torch.where(swap, d3, torch.zeros_like(d3))
        if squeeze:
            gated = gated.squeeze(0)
        return output + gated.to(output.dtype)
