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

from .edit_requests import EditRequest, fact_token_index, fill_template, pad_id_of, pad_right, target_ids
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


def _value_batch(tok, request: EditRequest, templates: Sequence[str], fact_token: str = "subject_last"):
    """ids, lookup indices (the fact token, `fact_token_index`), and (row, position, token) of the target NLL."""
    tgt = target_ids(tok, request.target)
    seqs, lookups, label_pos = [], [], []
    for t in templates:
        text, offset = fill_template(t, request.prompt)
        ids, idx = fact_token_index(tok, text, offset + request.subject_end, fact_token)
        seqs.append(ids + tgt[:-1])
        lookups.append(idx)
        label_pos.append([len(ids) - 1 + j for j in range(len(tgt))])
    kl_text, kl_offset = fill_template(KL_TEMPLATE, request.subject)
    kl_ids, kl_idx = fact_token_index(tok, kl_text, kl_offset + len(request.subject), fact_token)
    seqs.append(kl_ids)
    lookups.append(kl_idx)
    return seqs, lookups, label_pos, tgt


# ----------------------------------------------------------------------------- the optimiser
class _Enough(Exception):
    """Raised once the cached block has run: the blocks above it need not."""


class LowerBlocksCache:
    """Run blocks 0..L once, then replay: block L returns its cached output, the blocks below it pass through.

    δ is added at block L's output, so nothing up to and including block L depends on it: every optimisation
    step would recompute the same activations. Replaying them skips (L+1)/N of each step's forward. The
    output structure (a tensor in transformers 5, a tuple before) is copied from the real pass.
    """

    def __init__(self, model, block_names: Sequence[str]):
        self.model = model
        self.blocks = [get_module(model, n) for n in block_names]
        self.output = None  # (B, T, d) of the top block, for the sequences of `fill`
        self.structure = {}  # id(block) → (is_tuple, tail)
        self.select = None

    @torch.no_grad()
    def fill(self, ids, mask):
        def record(mod, args, out):
            self.structure[id(mod)] = (isinstance(out, tuple), tuple(out[1:]) if isinstance(out, tuple) else ())
            if mod is self.blocks[-1]:
                self.output = (out[0] if isinstance(out, tuple) else out).detach()
                raise _Enough
        handles = [b.register_forward_hook(record) for b in self.blocks]
        try:
            self.model(input_ids=ids, attention_mask=mask, use_cache=False)
        except _Enough:
            pass
        finally:
            for h in handles:
                h.remove()

    def _wrap(self, block, hidden):
        is_tuple, tail = self.structure[id(block)]
        return (hidden,) + tail if is_tuple else hidden

    @contextmanager
    def replaying(self, rows: torch.Tensor):
        """Within: a forward over the sequences `rows` of `fill` (same order, any width ≤ the filled one)."""
        def passthrough(block):
            def forward(*args, **kwargs):
                return self._wrap(block, args[0] if args else kwargs["hidden_states"])
            return forward

        def top(block):
            def forward(*args, **kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                return self._wrap(block, self.output[rows, :h.shape[1]])
            return forward

        for b in self.blocks[:-1]:
            b.forward = passthrough(b)
        self.blocks[-1].forward = top(self.blocks[-1])
        try:
            yield
        finally:
            for b in self.blocks:
                del b.forward  # the class's forward again


def _head_logits(model, ids, mask, rows, pos):
    """Logits only at (rows, pos): the base model's final hidden states through the output embedding.

    Computing the vocabulary projection at a few dozen positions instead of every token saves most of
    the head's cost (49k × 576 per token on SmolLM2). Falls back to full logits for heads that do more
    than a projection (soft-capping, scaling)."""
    head = model.get_output_embeddings()
    special = any(getattr(model.config, a, None) for a in ("final_logit_softcapping", "logit_scale"))
    if head is None or special or getattr(model, "base_model", None) is model:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[rows, pos]
    hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return head(hidden[rows, pos])


def _blocks_up_to(hparams, layer_name: str) -> List[str]:
    """Names of blocks 0..L where block L is `layer_name` (an instance of hparams.layer_module_tmp)."""
    top = next(i for i in range(10_000) if hparams.layer_module_tmp.format(i) == layer_name)
    return [hparams.layer_module_tmp.format(i) for i in range(top + 1)]


def compute_values(model, tok, requests: Sequence[EditRequest], hparams, layer_name: str,
                   templates: Sequence[str], set_mask: Optional[Callable] = None, progress=None) -> torch.Tensor:
    """v for every request (d × n), all requests optimised together: one pass per step.

    Same objective, optimiser and stopping rule as MEMIT's one-request loop (kept as the test oracle in
    tests/value_oracle.py; a batch of one is that loop's step for one request): the deltas are
    independent rows of one (n × d) parameter, the summed loss gives each row exactly its own gradient,
    Adam is elementwise, each row is clamped to its own ball, and a request whose loss falls below
    `v_loss_stop` is frozen and its sequences leave the batch."""
    device = model_device(model)
    n, n_rw = len(requests), len(templates)
    per = [_value_batch(tok, r, templates, hparams.fact_token) for r in requests]
    seqs = [s for p in per for s in p[0]]
    lookups = [i for p in per for i in p[1]]
    owner = [r for r, p in enumerate(per) for _ in p[0]]  # request of each sequence
    ids_all, mask_all = pad_right(seqs, pad_id_of(tok), device)
    per_req_seqs = n_rw + 1

    block = get_module(model, layer_name)
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd")
    delta = torch.zeros(n, hidden, dtype=torch.float32, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hparams.v_lr)
    init = torch.zeros(n, hidden, dtype=torch.float32, device=device)
    have_init = torch.zeros(n, dtype=torch.bool)
    kl_init = [None] * n
    active = list(range(n))
    cur = {}

    def add_delta(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        rows, at, reqs = cur["rows"], cur["at"], cur["reqs"]
        first = rows[cur["raw_rows"]]
        for j, r in enumerate(cur["active"]):  # h at the raw prompt's subject token, before any delta
            if not have_init[r]:
                init[r] = h[first[j], at[cur["raw_rows"][j]]].detach().float()
                have_init[r] = True
        add = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        add = add.index_put((rows, at), delta[reqs])
        h = h + add.to(h.dtype)
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    lower = LowerBlocksCache(model, _blocks_up_to(hparams, layer_name))
    if set_mask is not None:
        set_mask(mask_all)
    lower.fill(ids_all, mask_all)
    handle = block.register_forward_hook(add_delta)
    try:
        with frozen(model):
            steps = range(hparams.v_num_grad_steps)
            for it in (progress(steps, desc=f"CoachHooK values ({n} edits)") if progress else steps):
                sel = [s for r in active for s in range(r * per_req_seqs, (r + 1) * per_req_seqs)]
                ids, mask = ids_all[sel], mask_all[sel]
                width = int(mask.sum(1).max())
                ids, mask = ids[:, :width], mask[:, :width]
                rows = torch.arange(len(sel), device=device)
                cur.update(rows=rows, at=torch.tensor([lookups[s] for s in sel], device=device),
                           reqs=torch.tensor([owner[s] for s in sel], device=device), active=list(active),
                           raw_rows=[j * per_req_seqs for j in range(len(active))])
                # positions the loss reads: every target token of every rewrite row, and the KL token
                q_rows, q_pos, q_tok, q_req = [], [], [], []
                for j, r in enumerate(active):
                    _, lk, label_pos, tgt = per[r]
                    for t in range(n_rw):
                        for p, tk in zip(label_pos[t], tgt):
                            q_rows.append(j * per_req_seqs + t), q_pos.append(p), q_tok.append(tk), q_req.append(j)
                kl_rows = [j * per_req_seqs + n_rw for j in range(len(active))]
                kl_pos = [per[r][1][-1] for r in active]
                if set_mask is not None:
                    set_mask(mask)
                with lower.replaying(torch.tensor(sel, device=device)):
                    logits = _head_logits(model, ids, mask, torch.tensor(q_rows + kl_rows, device=device),
                                          torch.tensor(q_pos + kl_pos, device=device)).float()
                n_q = len(q_rows)
                log_probs = torch.log_softmax(logits[:n_q], dim=-1)
                nll_tok = -log_probs.gather(1, torch.tensor(q_tok, device=device)[:, None]).squeeze(1)
                kl_lp = torch.log_softmax(logits[n_q:], dim=-1)
                losses = []
                for j, r in enumerate(active):
                    tgt_len = len(per[r][3])
                    mine = torch.tensor([i for i, q in enumerate(q_req) if q == j], device=device)
                    nll = nll_tok[mine].view(n_rw, tgt_len).sum(1).div(tgt_len).mean()
                    if kl_init[r] is None:
                        kl_init[r] = kl_lp[j:j + 1].detach().clone()
                    kl = hparams.kl_factor * F.kl_div(kl_init[r], kl_lp[j:j + 1], log_target=True,
                                                      reduction="batchmean")
                    wd = hparams.v_weight_decay * (delta[r].norm() / init[r].norm() ** 2)
                    losses.append(nll + kl + wd)
                last = it == hparams.v_num_grad_steps - 1
                still = [r for r, loss in zip(active, losses) if loss.item() >= hparams.v_loss_stop and not last]
                if not still:
                    break
                opt.zero_grad()
                torch.stack([loss for r, loss in zip(active, losses) if r in still]).sum().backward()
                frozen_rows = [r for r in range(n) if r not in still]
                keep = delta.detach()[frozen_rows].clone()
                opt.step()
                with torch.no_grad():
                    delta[frozen_rows] = keep  # finished requests do not move (Adam momentum would)
                    max_norm = hparams.clamp_norm_factor * init.norm(dim=1, keepdim=True)
                    norms = delta.norm(dim=1, keepdim=True)
                    delta.mul_(torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms)))
                active = still
    finally:
        handle.remove()
        if set_mask is not None:
            set_mask(None)
    return (init + delta.detach()).t().float()
