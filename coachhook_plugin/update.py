"""The consecutive least-squares step (paper Eq. 13–15).

    Δ = R K₂ᵀ C_accu⁻¹,   C_accu = λ·E[kkᵀ] + Σ_{earlier batches} K'K'ᵀ + K₂K₂ᵀ

R (d_out × n) is the residual V₂ − W_h K₂ measured on the current hook weights, K₂ (d_in × n) the batch's
keys. C_accu is symmetric positive definite, so Δᵀ = C_accu⁻¹ K₂ Rᵀ comes from one Cholesky solve in
float64 — never an explicit inverse. If C_accu is not positive definite or is ill-conditioned beyond what a
float64 solve can carry, β·I is added (the paper's suggestion) with a warning.
"""
from __future__ import annotations

import warnings

import torch

# a Cholesky factor whose diagonal spans more than this ratio means cond(C) > ~1e14: the solve is noise
MAX_CHOL_DIAG_RATIO = 1e7


def accumulated_keys_for(hook, prior: torch.Tensor, keys: torch.Tensor, lam: float) -> torch.Tensor:
    """C_accu = λ·E[kkᵀ] + Σ earlier K'K'ᵀ + K Kᵀ, float64 (d_in × d_in), for a HookLayer `hook` (its stored
    keys, or their Gram, are the earlier batches') and this batch's keys K (d_in × n). Σ K'K'ᵀ is added in
    place, never materialised separately: one d_in × d_in float64 buffer in all."""
    k = keys.double().to(prior.device)
    c = prior.to(torch.float64, copy=True).mul_(lam)
    hook.add_gram_to(c)
    return c.addmm_(k, k.t())


def _beta(a: torch.Tensor) -> float:
    return 1e-6 * float(a.diagonal().abs().mean().clamp(min=1e-12))


def solve_spd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a⁻¹ b for symmetric positive (semi)definite a; if a is singular or too ill-conditioned, add β·I and warn."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        diag = chol.diagonal().abs()
        ratio = float(diag.max() / diag.min().clamp(min=1e-300))
        if ratio <= MAX_CHOL_DIAG_RATIO:
            return torch.cholesky_solve(b, chol)
        why = f"ill-conditioned (Cholesky diagonal spans a factor {ratio:.3g}, cond ≳ {ratio ** 2:.1g})"
    else:
        why = f"not positive definite (Cholesky failed at column {int(info)})"
    beta = _beta(a)
    warnings.warn(f"C_accu is {why}; adding β·I with β = {beta:.3g} as the paper suggests", RuntimeWarning)
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    reg = a + beta * eye
    chol, info = torch.linalg.cholesky_ex(reg)
    if int(info) == 0:
        return torch.cholesky_solve(b, chol)
    return torch.linalg.solve(reg, b)


def hook_update(residual: torch.Tensor, keys: torch.Tensor, c_accu: torch.Tensor) -> torch.Tensor:
    """Δ = R Kᵀ C_accu⁻¹ = R (C_accu⁻¹ K)ᵀ (Eq. 13; C_accu symmetric), float64, shape (d_out × d_in).

    The solve has n right-hand sides (the batch's keys), not d_out."""
    p = solve_spd(c_accu, keys.to(c_accu.device, torch.float64))
    return residual.to(p.device, torch.float64) @ p.t()
