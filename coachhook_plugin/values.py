"""Values v_i (MEMIT's compute_z), optimised on the model *with its current validated hooks*.

v = h + δ at the last edit layer's block output, subject's last token. δ minimises
    NLL(target | template + prompt)  +  kl_factor · KL on "{subject} is a"  +  wd · ‖δ‖ / ‖h‖²
with Adam, projected into the ball ‖δ‖ ≤ clamp_norm_factor · ‖h‖, stopped once the loss is below
`v_loss_stop` — MEMIT's procedure, with the target appended as token ids (no decode/re-encode round trip).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .edit_requests import EditRequest, fact_token_index, fill_template, pad_id_of, pad_right, target_ids
from .models import cache_keyword, get_module, model_body, model_device, plain_head

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
class LowerBlocksCache:
    """One pass over the whole sequences, then each step computes only the positions δ can change.

    δ is added at block L's output at the fact token, so (causal attention) nothing before the fact token and
    nothing up to and including block L depends on it. `fill` runs the sequences once and keeps block L's
    output and every layer's keys and values; within `replaying`, blocks 0..L return block L's kept output and
    the blocks above it attend to the kept keys and values of the earlier positions. Each step then runs the
    blocks above L on the positions from the fact token on, rather than on whole padded sequences. The output
    structure (a tensor in transformers 5, a tuple before) is copied from the real pass.
    """

    def __init__(self, model, block_names: Sequence[str]):
        self.model = model
        self.blocks = [get_module(model, n) for n in block_names]
        self.output = None  # (B, T, d) of the top block, for the sequences of `fill`
        self.past = None  # every layer's keys and values of the `fill` pass; None: the model returned none
        self.cache_keyword = None  # how the model's forward takes them
        self.structure = {}  # id(block) → (is_tuple, tail)

    @torch.no_grad()
    def fill(self, ids, mask):
        def record(mod, args, out):
            self.structure[id(mod)] = (isinstance(out, tuple), tuple(out[1:]) if isinstance(out, tuple) else ())
            if mod is self.blocks[-1]:
                self.output = (out[0] if isinstance(out, tuple) else out).detach()
        handles = [b.register_forward_hook(record) for b in self.blocks]
        body = model_body(self.model)
        self.cache_keyword = cache_keyword(body)
        try:
            past = body(input_ids=ids, attention_mask=mask, use_cache=True).get(self.cache_keyword)
        finally:
            for h in handles:
                h.remove()
        # a Cache object can be copied and cut to the rows of a step; a model without one is run from position 0
        self.past = past if hasattr(past, "batch_select_indices") else None

    def past_for(self, rows: torch.Tensor):
        """A fresh copy of the kept keys and values of `rows` (each step's pass appends its own to it)."""
        past = copy.deepcopy(self.past)
        past.batch_select_indices(rows)
        return past

    def _wrap(self, block, hidden):
        is_tuple, tail = self.structure[id(block)]
        return (hidden,) + tail if is_tuple else hidden

    @contextmanager
    def replaying(self, rows: torch.Tensor, positions: torch.Tensor):
        """Within: a forward over the positions `positions` (B, W) of the sequences `rows` of `fill`."""
        def passthrough(block):
            def forward(*args, **kwargs):
                return self._wrap(block, args[0] if args else kwargs["hidden_states"])
            return forward

        def top(block):
            def forward(*args, **kwargs):
                return self._wrap(block, self.output[rows[:, None], positions])
            return forward

        for b in self.blocks[:-1]:
            b.forward = passthrough(b)
        self.blocks[-1].forward = top(self.blocks[-1])
        try:
            yield
        finally:
            for b in self.blocks:
                del b.forward  # the class's forward again


def _outputs_at(model, rows, pos, **inputs):
    """The final hidden states at (rows, pos) when the model has a `plain_head`, else the logits there."""
    if plain_head(model) is None:
        return model(**inputs).logits[rows, pos]
    return model_body(model)(**inputs).last_hidden_state[rows, pos]


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
    `v_loss_stop` is frozen and its sequences leave the batch. A step runs the blocks above the value
    layer on the positions the loss depends on only (`LowerBlocksCache`)."""
    device = model_device(model)
    n, n_rw = len(requests), len(templates)
    per = [_value_batch(tok, r, templates, hparams.fact_token) for r in requests]
    seqs = [s for p in per for s in p[0]]
    lookups = [i for p in per for i in p[1]]
    owner = [r for r, p in enumerate(per) for _ in p[0]]  # request of each sequence
    per_req_seqs = n_rw + 1  # each request's rewrite rows, then its KL row
    # the last position each sequence's loss reads: its last target label (rewrite rows), the fact token (KL row)
    last = [len(s) - 1 if i % per_req_seqs < n_rw else lookups[i] for i, s in enumerate(seqs)]
    ids_all, mask_all = pad_right(seqs, pad_id_of(tok), device)

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
        for row, r in cur["raw"]:  # h at the raw prompt's subject token, before any delta
            if not have_init[r]:
                init[r] = h[row, cur["at"][row]].detach().float()
                have_init[r] = True
        add = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        add = add.index_put((torch.arange(h.shape[0], device=h.device), cur["at"]), delta[cur["reqs"]])
        h = h + add.to(h.dtype)
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    lower = LowerBlocksCache(model, _blocks_up_to(hparams, layer_name))
    if set_mask is not None:
        set_mask(mask_all)
    lower.fill(ids_all, mask_all)
    # each sequence is run from its fact token on, its earlier positions read from the kept keys and values
    first_pos = lookups if lower.past is not None else [0] * len(seqs)

    def outputs_at(sel: List[int], rows: List[int], pos: List[int], raw=()) -> torch.Tensor:
        """`_outputs_at` the points (sel[rows[i]], pos[i]) (positions in the full sequences), δ added: one pass
        over the sequences `sel`, each from its first computed position to the last one its loss reads. `raw`:
        (row, request) pairs whose block-L output at the fact token is the request's h."""
        sel_t = torch.tensor(sel, device=device)
        start = torch.tensor([first_pos[s] for s in sel], device=device)
        length = torch.tensor([last[s] + 1 - first_pos[s] for s in sel], device=device)
        offsets = torch.arange(int(length.max()), device=device)
        positions = (start[:, None] + offsets).clamp(max=ids_all.shape[1] - 1)  # (B, W) in the full rows
        real = offsets < length[:, None]
        ids = torch.where(real, ids_all[sel_t[:, None], positions], pad_id_of(tok))
        inputs = dict(input_ids=ids, position_ids=start[:, None] + offsets, use_cache=lower.past is not None)
        if lower.past is not None:
            earlier = torch.arange(ids_all.shape[1], device=device) < start[:, None]
            inputs.update(attention_mask=torch.cat([earlier, real], 1).long(),
                          **{lower.cache_keyword: lower.past_for(sel_t)})
        else:
            inputs.update(attention_mask=real.long())
        cur.update(at=torch.tensor([lookups[s] for s in sel], device=device) - start,
                   reqs=torch.tensor([owner[s] for s in sel], device=device), raw=list(raw))
        if set_mask is not None:
            set_mask(inputs["attention_mask"])
        rows_t = torch.tensor(rows, device=device)
        with lower.replaying(sel_t, positions):
            return _outputs_at(model, rows_t, torch.tensor(pos, device=device) - start[rows_t], **inputs)

    head = plain_head(model)
    handle = block.register_forward_hook(add_delta)
    try:
        with frozen(model):
            steps = range(hparams.v_num_grad_steps)
            for it in (progress(steps, desc=f"CoachHooK values ({n} edits)") if progress else steps):
                # positions the loss reads: every target token of every rewrite row (one pass), and the KL
                # token of each KL row (a second pass: one position each, not padded to the rewrite rows' width)
                rewrite = [r * per_req_seqs + t for r in active for t in range(n_rw)]
                q_rows, q_pos, q_tok, q_req = [], [], [], []
                for j, r in enumerate(active):
                    _, lk, label_pos, tgt = per[r]
                    for t in range(n_rw):
                        for p, tk in zip(label_pos[t], tgt):
                            q_rows.append(j * n_rw + t), q_pos.append(p), q_tok.append(tk), q_req.append(j)
                kl_seqs = [r * per_req_seqs + n_rw for r in active]
                out = torch.cat([outputs_at(rewrite, q_rows, q_pos, raw=[(j * n_rw, r) for j, r in enumerate(active)]),
                                 outputs_at(kl_seqs, list(range(len(active))), [lookups[s] for s in kl_seqs])])
                logits = (out if head is None else head(out)).float()
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
                final = it == hparams.v_num_grad_steps - 1
                still = [r for r, loss in zip(active, losses) if loss.item() >= hparams.v_loss_stop and not final]
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
