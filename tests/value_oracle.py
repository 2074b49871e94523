"""MEMIT's one-request-at-a-time value optimisation, kept as the oracle `values.compute_values` is tested against.

This was the package's per-request path; the package now has one optimiser (`compute_values`, which runs a
batch of one when `v_batched` is false). Same objective, optimiser and stopping rule, written the plain way:
one full forward per step, the whole vocabulary projected at every position.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from coachhook_plugin.edit_requests import EditRequest, pad_id_of, pad_right
from coachhook_plugin.models import get_module, model_device
from coachhook_plugin.values import _value_batch, frozen


def compute_value(model, tok, request: EditRequest, hparams, layer_name: str, templates: Sequence[str],
                  set_mask: Optional[Callable] = None) -> torch.Tensor:
    """The target hidden state v (d,) for one request at block `layer_name`."""
    device = model_device(model)
    seqs, lookups, label_pos, tgt = _value_batch(tok, request, templates, hparams.fact_token)
    ids, mask = pad_right(seqs, pad_id_of(tok), device)
    n_rw = len(templates)
    rows = torch.arange(len(seqs), device=device)
    at = torch.tensor(lookups, device=device)
    lab_rows = torch.tensor([i for i in range(n_rw) for _ in label_pos[i]], device=device)
    lab_pos = torch.tensor([p for ps in label_pos for p in ps], device=device)
    lab_tok = torch.tensor(tgt * n_rw, device=device)

    block = get_module(model, layer_name)
    state = {"init": None}
    delta_holder: List[torch.Tensor] = []

    def add_delta(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        if state["init"] is None:
            state["init"] = h[0, lookups[0]].detach().float().clone()
        onehot = torch.zeros(h.shape[:2], dtype=h.dtype, device=h.device)
        onehot[rows, at] = 1
        h = h + onehot.unsqueeze(-1) * delta_holder[0].to(h.dtype)
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd")
    delta = torch.zeros(hidden, dtype=torch.float32, device=device, requires_grad=True)
    delta_holder.append(delta)
    opt = torch.optim.Adam([delta], lr=hparams.v_lr)
    kl_init = None
    handle = block.register_forward_hook(add_delta)
    if set_mask is not None:
        set_mask(mask)
    try:
        with frozen(model):
            for it in range(hparams.v_num_grad_steps):
                opt.zero_grad()
                logits = model(input_ids=ids, attention_mask=mask).logits
                log_probs = torch.log_softmax(logits[lab_rows, lab_pos].float(), dim=-1)
                nll_each = -log_probs.gather(1, lab_tok[:, None]).squeeze(1)
                nll = nll_each.view(n_rw, len(tgt)).sum(1).div(len(tgt)).mean()
                kl_log_probs = torch.log_softmax(logits[-1, lookups[-1]].float(), dim=-1)[None]
                if kl_init is None:
                    kl_init = kl_log_probs.detach().clone()
                kl = hparams.kl_factor * F.kl_div(kl_init, kl_log_probs, log_target=True, reduction="batchmean")
                init = state["init"]
                wd = hparams.v_weight_decay * (delta.norm() / init.norm() ** 2)
                loss = nll + kl + wd
                if hparams.verbose:
                    print(f"  v-opt {it}: loss {loss.item():.3f} = {nll.item():.3f} + {kl.item():.3f} + "
                          f"{wd.item():.3f}; p(target) {torch.exp(-nll).item():.3f}")
                if loss.item() < hparams.v_loss_stop or it == hparams.v_num_grad_steps - 1:
                    break
                loss.backward()
                opt.step()
                max_norm = hparams.clamp_norm_factor * init.norm()
                with torch.no_grad():
                    if delta.norm() > max_norm:
                        delta.mul_(max_norm / delta.norm())
    finally:
        handle.remove()
        if set_mask is not None:
            set_mask(None)
    return (state["init"] + delta.detach()).float()
