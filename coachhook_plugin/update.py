"""The consecutive least-squares step (paper Eq. 13–15).

    Δ = R K₂ᵀ C_accu⁻¹,   C_accu = λ·E[kkᵀ] + Σ_{earlier batches} K'K'ᵀ + K₂K₂ᵀ

R (d_out × n) is the residual V₂ − W_h K₂ measured on the current hook weights, K₂ (d_in × n) the batch's
keys. C_accu is symmetric positive definite, so Δᵀ = C_accu⁻¹ K₂ Rᵀ comes from one Cholesky solve in
float64 — never an explicit inverse.
"""
from __future__ import annotations

import warnings

import torch


def accumulated_keys(prior: torch.Tensor, key_gram: torch.Tensor, keys: torch.Tensor, lam: float) -> torch.Tensor:
    """C_accu = λ·E[kkᵀ] + Σ earlier K'K'ᵀ + K Kᵀ, float64 (d_in × d_in)."""
    k = keys.double()
    return lam * prior.double() + key_gram.double() + k @ k.t()


def solve_spd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a⁻¹ b for symmetric positive (semi)definite a; if a is numerically singular, add β·I and warn."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, chol)
    beta = 1e-6 * float(a.diagonal().abs().mean().clamp(min=1e-12))
    warnings.warn(f"C_accu is not positive definite (Cholesky failed at column {int(info)}); adding "
                  f"β·I with β = {beta:.3g} as the paper suggests", RuntimeWarning)
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return torch.linalg.solve(a + beta * eye, b)


def hook_update(residual: torch.Tensor, keys: torch.Tensor, c_accu: torch.Tensor) -> torch.Tensor:
    """Δ = R Kᵀ C_accu⁻¹ (Eq. 13), returned in float64, shape (d_out × d_in)."""
    return solve_spd(c_accu, keys.double() @ residual.double().t()).t()
