"""GRACE (Hartvigsen et al., 2023, "Aging with GRACE"): a discrete key → value codebook at one layer.

The plugin's own implementation, used where the installed EasyEdit has no GRACE.

* A **key** is the input of the wrapped module (``rewrite_module_tmp`` at ``layers[0]``, the FFN
  down-projection by default) at the edit prompt's last token; its **value** replaces that module's
  output wherever an input falls inside the key's **deferral radius** ε (Euclidean). Everywhere else the
  model is untouched, so locality is exact outside every ball.
* Edits are written one at a time (GRACE's batch size is 1). For a new key at distance d from its nearest
  entry j:  d > ε_j + ε_init → new entry (radius ε_init);  same label (target) → **expand**
  ε_j = max(ε_j, d) so the ball covers the new key;  different label → **split**: ε_j and the new
  entry's radius both become d / 2, so the balls no longer overlap.
* A new entry's value starts at the module's own output for the key ("warm", or zeros: "cold") and is
  trained for ``n_iter`` Adam steps on the target's teacher-forced NLL, the rest of the model frozen.
* The codebook is checked at every token position (also while generating with the KV cache), so the
  replacement also fires when the edited prompt is a prefix of a longer input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, List, Optional, Tuple

import functools

import torch

from ._common import BaselineHyperParams, model_device, target_batch, target_nll

ALG_NAME = "GRACE"
STATE_ATTR = "_grace_codebook"
STOP_LOSS = 1e-2
SAME_KEY = 1e-6  # keys closer than this are the same input


@dataclass
class GRACEHyperParams(BaselineHyperParams):
    ALG_NAME: ClassVar[str] = ALG_NAME
    layers: List[int]  # one layer: GRACE edits a single module
    rewrite_module_tmp: str
    eps: float = 1.0  # ε_init, the initial deferral radius
    n_iter: int = 100
    edit_lr: float = 1.0
    val_init: str = "warm"  # "warm": the module's own output for the key; "cold": zeros

    def __post_init__(self):
        super().__post_init__()
        if len(self.layers) != 1:
            raise ValueError(f"GRACE edits one layer; hparams 'layers' must hold one index, got {self.layers}")
        if not float(self.eps) > 0:
            raise ValueError(f"GRACE hparams 'eps' (deferral radius) must be > 0, got {self.eps}")
        if self.val_init not in ("warm", "cold"):
            raise ValueError(f"GRACE hparams 'val_init' must be 'warm' or 'cold', got {self.val_init!r}")
        self.eps, self.n_iter = float(self.eps), int(self.n_iter)

    @property
    def module_name(self) -> str:
        return self.rewrite_module_tmp.format(self.layers[0])


class GraceCodebook:
    """Keys, values, radii and labels at one module, applied by a forward hook."""

    def __init__(self, model: torch.nn.Module, module_name: str):
        self.module_name = module_name
        self.module = model.get_submodule(module_name)
        self.keys: List[torch.Tensor] = []  # (d_in,) float32
        self.values: List[torch.Tensor] = []  # (d_out,) float32
        self.radii: List[float] = []
        self.labels: List[str] = []
        self.trainable: Optional[Tuple[int, torch.nn.Parameter]] = None  # the value being optimised
        self.hits = 0  # token positions replaced since creation (for diagnostics)
        self.handle = self.module.register_forward_hook(self._hook)

    def __len__(self) -> int:
        return len(self.keys)

    def snapshot(self) -> dict:
        return {"keys": list(self.keys), "values": [v.clone() for v in self.values], "radii": list(self.radii),
                "labels": list(self.labels)}

    def restore(self, snap: dict) -> None:
        self.keys, self.values = list(snap["keys"]), [v.clone() for v in snap["values"]]
        self.radii, self.labels = list(snap["radii"]), list(snap["labels"])

    def detach(self) -> None:
        self.handle.remove()

    def nearest(self, key: torch.Tensor) -> Tuple[int, float]:
        dists = torch.cdist(key[None].float(), torch.stack(self.keys).to(key.device))[0]
        j = int(dists.argmin())
        return j, float(dists[j])

    def _value_table(self, device) -> torch.Tensor:
        values = list(self.values)
        if self.trainable is not None:
            index, param = self.trainable
            values[index] = param
        return torch.stack([v.to(device) for v in values])

    def _hook(self, module, inputs, output):
        if not self.keys:
            return output
        x = inputs[0]
        flat = x.reshape(-1, x.shape[-1]).float()
        keys = torch.stack(self.keys).to(flat.device)
        dists = torch.cdist(flat, keys)  # (tokens, entries)
        best, index = dists.min(dim=1)
        radii = torch.tensor(self.radii, device=flat.device)
        hit = best <= radii[index]
        if not bool(hit.any()):
            return output
        self.hits += int(hit.sum())
        chosen = self._value_table(flat.device)[index]
        out = output.reshape(-1, output.shape[-1])
        out = torch.where(hit[:, None], chosen.to(out.dtype), out)
        return out.reshape(output.shape)


def get_codebook(model) -> Optional[GraceCodebook]:
    return getattr(model, STATE_ATTR, None)


def remove_grace(model) -> None:
    book = get_codebook(model)
    if book is not None:
        book.detach()
        delattr(model, STATE_ATTR)


def _ensure_codebook(model, hparams: GRACEHyperParams) -> GraceCodebook:
    book = get_codebook(model)
    if book is not None and book.module_name != hparams.module_name:
        raise ValueError(f"this model already has a GRACE codebook at {book.module_name}; call "
                         f"coachhook_plugin.bench.baselines.grace.remove_grace(model) before editing {hparams.module_name}")
    if book is None:
        book = GraceCodebook(model, hparams.module_name)
        object.__setattr__(model, STATE_ATTR, book)  # a plain attribute: not a submodule, not in state_dict
    return book


@torch.no_grad()
def _key_and_output(model, tok, book: GraceCodebook, prompt: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The module's input at the prompt's last token (the key) and its unedited output there."""
    seen = {}

    def grab(module, inputs, output):
        seen["x"], seen["y"] = inputs[0][0, -1].detach().float(), output[0, -1].detach().float()

    ids = torch.tensor([tok(prompt)["input_ids"]], device=model_device(model))
    handle = book.module.register_forward_hook(grab, prepend=True)  # before the codebook's replacement
    try:
        model(input_ids=ids)
    finally:
        handle.remove()
    return seen["x"], seen["y"]


def _train_value(model, tok, book: GraceCodebook, index: int, init: torch.Tensor, request: Dict,
                 hparams: GRACEHyperParams) -> torch.Tensor:
    param = torch.nn.Parameter(init.clone())
    device = model_device(model)
    ids, mask, labels = target_batch(tok, [request["prompt"]], [request["target_new"]], device)
    opt = torch.optim.Adam([param], lr=hparams.edit_lr)
    grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    book.trainable = (index, param)
    try:
        for _ in range(hparams.n_iter):
            opt.zero_grad()
            loss = target_nll(model, ids, mask, labels)
            if loss.item() < STOP_LOSS:
                break
            loss.backward()
            opt.step()
    finally:
        book.trainable = None
        for n, p in model.named_parameters():
            p.requires_grad_(grad_before[n])
    return param.detach().clone()


def grace_edit(model, tok, request: Dict, hparams: GRACEHyperParams) -> str:
    """Write one edit; returns what happened to the codebook: 'add', 'expand', 'split' or 'replace'."""
    book = _ensure_codebook(model, hparams)
    key, own_output = _key_and_output(model, tok, book, request["prompt"])
    label = request["target_new"].strip()
    action, radius = "add", hparams.eps
    if len(book):
        j, d = book.nearest(key)
        if d <= SAME_KEY and book.labels[j] != label:
            # the very same key with a new answer: the newer edit replaces the entry's value (a split would
            # leave two radius-0 balls at one point, and the older one would keep winning)
            book.labels[j] = label
            book.values[j] = _train_value(model, tok, book, j, book.values[j], request, hparams)
            return "replace"
        if d <= book.radii[j] + hparams.eps:
            if book.labels[j] == label:
                book.radii[j] = max(book.radii[j], d)  # expand: cover the new key, same answer
                return "expand"
            action = "split"  # conflicting answers: shrink both balls so they no longer overlap
            book.radii[j] = radius = d / 2
    init = own_output if hparams.val_init == "warm" else torch.zeros_like(own_output)
    book.keys.append(key)
    book.values.append(init)
    book.radii.append(radius)
    book.labels.append(label)
    book.values[-1] = _train_value(model, tok, book, len(book) - 1, init, request, hparams)
    return action


def apply_grace_to_model(model, tok, requests: List[Dict], hparams: GRACEHyperParams, copy: bool = False,
                         return_orig_weights: bool = False, keep_original_weight: bool = False,
                         **kwargs) -> Tuple[torch.nn.Module, Callable[[], None]]:
    """EasyEdit's apply contract: the requests are written one after another (GRACE edits singly).
    Consecutive calls grow one codebook; ``keep_original_weight`` starts from an empty one and the returned
    handle empties it again (single-round). The base weights never change."""
    if copy:
        raise ValueError("GRACE edits through a hook on the given model; copy=True is not supported "
                         "(deep-copy the model yourself before editing)")
    book = _ensure_codebook(model, hparams)
    before = book.snapshot()
    if keep_original_weight:
        book.restore({"keys": [], "values": [], "radii": [], "labels": []})
    restore_point = book.snapshot()
    try:
        actions = [grace_edit(model, tok, r, hparams) for r in requests]
    except BaseException:
        book.restore(before)
        raise
    book.last_actions = actions
    return model, torch.no_grad()(functools.partial(book.restore, restore_point))  # served by the registry's RestoreHandle
