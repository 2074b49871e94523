"""Keys k_i (MEMIT's compute_ks) and the current hidden state at the value layer, in one pass.

k_i at layer l is the input of the down-projection at the subject's last token, averaged over the
context templates; the current h_i at the last edit layer is the block output at the same token for the
raw prompt (template "{}"), which is what the residual R = V − h is measured against.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Sequence, Tuple

import torch

from .edit_requests import EditRequest, fact_token_index, fill_template, pad_id_of, pad_right
from .models import get_module, model_device


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


@contextmanager
def capture(model: torch.nn.Module, inputs_of: Sequence[str] = (), outputs_of: Sequence[str] = ()):
    """Record the first positional input / the (first) output of named modules during a forward."""
    store: Dict[Tuple[str, str], torch.Tensor] = {}
    handles = []
    for name in inputs_of:
        def pre(mod, args, _n=name):
            store[("in", _n)] = args[0].detach()
        handles.append(get_module(model, name).register_forward_pre_hook(pre))
    for name in outputs_of:
        # registered after any hook-layer hook on the same module, so it sees the hooked output
        def post(mod, args, out, _n=name):
            store[("out", _n)] = _first(out).detach()
        handles.append(get_module(model, name).register_forward_hook(post))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


class _Enough(Exception):
    """Raised once the deepest module needed has run: the blocks above it need not."""


@contextmanager
def _stop_after(module: torch.nn.Module):
    def stop(mod, args, out):
        raise _Enough
    handle = module.register_forward_hook(stop)  # registered last: runs after the capturing hooks
    try:
        yield
    finally:
        handle.remove()


def template_texts(requests: Sequence[EditRequest], templates: Sequence[str], tok, fact_token: str = "subject_last"):
    """For every (request, template): token ids and the index of the fact token (`fact_token_index`)."""
    seqs, idxs = [], []
    for r in requests:
        for t in templates:
            text, offset = fill_template(t, r.prompt)
            ids, idx = fact_token_index(tok, text, offset + r.subject_end, fact_token)
            seqs.append(ids)
            idxs.append(idx)
    return seqs, idxs


@torch.no_grad()
def compute_keys_and_hidden(model, tok, requests: Sequence[EditRequest], templates: Sequence[str],
                            key_module: str, hidden_module: str, set_mask=None,
                            fact_token: str = "subject_last") -> Tuple[torch.Tensor, torch.Tensor]:
    """K (d_in × n): template-averaged down-projection inputs; H (d × n): block output at the raw prompt; both
    at the fact token (`fact_token`: the subject's last token, or the prompt's last).

    `templates[0]` must be "{}" (the raw prompt), as in MEMIT's context templates.
    """
    assert templates[0] == "{}", "the first context template must be the raw prompt '{}'"
    seqs, idxs = template_texts(requests, templates, tok, fact_token)
    ids, mask = pad_right(seqs, pad_id_of(tok), model_device(model))
    rows = torch.arange(len(seqs), device=ids.device)
    at = torch.tensor(idxs, device=ids.device)
    if set_mask is not None:
        set_mask(mask)
    try:
        with capture(model, inputs_of=[key_module], outputs_of=[hidden_module]) as store, \
                _stop_after(get_module(model, hidden_module)):
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Enough:
        pass  # nothing above the value layer is needed
    finally:
        if set_mask is not None:
            set_mask(None)
    n, t = len(requests), len(templates)
    keys = store[("in", key_module)][rows, at].float().view(n, t, -1).mean(dim=1)
    hidden = store[("out", hidden_module)][rows, at].float().view(n, t, -1)[:, 0]
    return keys.t(), hidden.t()
