"""Values v_i (MEMIT's compute_z), optimised on the model *with its current validated hooks*.

v = h + δ at the last edit layer's block output, subject's last token. δ minimises
    NLL(target | template + prompt)  +  kl_factor · KL on "{subject} is a"  +  wd · ‖δ‖ / ‖h‖²
with Adam, projected into the ball ‖δ‖ ≤ clamp_norm_factor · ‖h‖, stopped once the loss is below
`v_loss_stop` — MEMIT's procedure, with the target appended as token ids (no decode/re-encode round trip).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .edit_requests import (EditRequest, fill_template, pad_id_of, pad_right, target_ids,
                            token_index_of_char)
from .models import get_module, model_device

KL_TEMPLATE = "{} is a"


@contextmanager
def frozen(model: torch.nn.Module):
    """No parameter gradients and eval mode for the duration; restores both afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def _value_batch(tok, request: EditRequest, templates: Sequence[str]):
    """ids, lookup indices, and (row, position, token) triples of the target NLL."""
    tgt = target_ids(tok, request.target)
    seqs, lookups, label_pos = [], [], []
    for t in templates:
        text, offset = fill_template(t, request.prompt)
        ids, idx = token_index_of_char(tok, text, offset + request.subject_end)
        seqs.append(ids + tgt[:-1])
        lookups.append(idx)
        label_pos.append([len(ids) - 1 + j for j in range(len(tgt))])
    kl_text, kl_offset = fill_template(KL_TEMPLATE, request.subject)
    kl_ids, kl_idx = token_index_of_char(tok, kl_text, kl_offset + len(request.subject))
    seqs.append(kl_ids)
    lookups.append(kl_idx)
    return seqs, lookups, label_pos, tgt


def compute_value(model, tok, request: EditRequest, hparams, layer_name: str, templates: Sequence[str],
                  set_mask: Optional[Callable] = None) -> torch.Tensor:
    """The target hidden state v (d,) for one request at block `layer_name`."""
    device = model_device(model)
    seqs, lookups, label_pos, tgt = _value_batch(tok, request, templates)
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
