"""SERAC's memory in consecutive and single-round editing, and a view of a SERAC-edited model that any scorer can call.

EasyEdit's SERAC edits no weight: ``SeracRewriteExecutor.apply_to_model`` returns a *new* ``SERAC`` wrapper (the base
model, the scope classifier, the counterfactual model) whose memory (``cache_inputs`` / ``cache_labels``) is the
executor's own memory plus the edited requests. The executor's memory itself never grows (it is a process-wide
singleton that ignores the model it is handed once initialised), so EasyEdit's sequential editing keeps only the
last call's edits: a consecutive benchmark of SERAC needs the memory carried over, and a single-round one needs it
emptied again. :func:`set_executor_memory` does both, from the model being edited; :class:`MemoryRollback` is the
roll-back handle.

The wrapper's ``forward`` returns a bare tensor of (log-)probabilities, and it decodes, re-tokenises and re-pads
every input (the counterfactual model reads ``memory entry + input``, aligned on the right end): with a right-padded
batch the counterfactual positions do not line up with the base model's. :class:`SeracView` calls it one sequence
at a time, without padding, and puts the rows back in place; ``generate`` is SERAC's own rule (the counterfactual
model answers when the classifier's best similarity is above 0.5), returning the prompt followed by the new tokens.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, List, Tuple

import torch

from .devices import cpu_fallback

_SERAC_PARTS = ("cache_inputs", "cache_labels", "classifier", "replacement", "run_classifier")


def is_serac(model: Any) -> bool:
    """Whether ``model`` is EasyEdit's SERAC wrapper (what its SERAC executor returns)."""
    return isinstance(model, torch.nn.Module) and all(hasattr(model, a) for a in _SERAC_PARTS)


def memory(model: Any) -> Tuple[List[str], List[str]]:
    """(inputs, labels) SERAC holds for ``model``: the wrapper's memory, empty for a model SERAC has not edited."""
    if is_serac(model):
        return list(model.cache_inputs), list(model.cache_labels)
    return [], []


def executor_memory(apply_algo) -> Tuple[List[str], List[str]]:
    """The memory the SERAC executor behind ``apply_algo`` (``BaseEditor.apply_algo``) edits from next."""
    return memory(getattr(getattr(apply_algo, "__self__", None), "alg", None))


def set_executor_memory(apply_algo, model: Any) -> None:
    """Make the next SERAC edit through ``apply_algo`` start from ``model``'s memory: all edits so far (consecutive)
    or none (``model`` is the base model: a single-round roll-back). An executor not initialised yet starts empty."""
    executor = getattr(apply_algo, "__self__", None)
    alg = getattr(executor, "alg", None)
    if not getattr(executor, "is_init", False) or not is_serac(alg):
        return
    alg.cache_inputs, alg.cache_labels = memory(model)


@dataclasses.dataclass
class MemoryRollback:
    """Undoes one SERAC edit: ``model`` is what was being edited (the base model, or the SERAC holding the earlier
    edits); rolling back makes it the edited model again and the executor's memory its memory."""
    model: Any


class SeracView:
    """A SERAC-edited model as scorers call a causal LM: ``view(input_ids=, attention_mask=).logits`` (SERAC's
    log-probabilities: the same argmax and softmax as logits) and ``view.generate(...)``; the base model's weights as
    ``parameters()`` (SERAC never changes them), everything else from the base model."""

    def __init__(self, serac):
        self.serac = serac
        self._classifier_memo = _ClassifierMemo(serac.classifier)

    def __getattr__(self, name):
        if name == "serac":
            raise AttributeError(name)
        return getattr(self.serac.model, name)

    def parameters(self, *args, **kwargs):
        return self.serac.model.parameters(*args, **kwargs)

    @staticmethod
    def _rows(input_ids, attention_mask):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        for i in range(input_ids.shape[0]):
            keep = mask[i].bool()
            yield i, keep, input_ids[i, keep][None]

    @torch.no_grad()
    def __call__(self, input_ids=None, attention_mask=None, **_ignored):
        out = None
        with cpu_fallback(), self._classifier_memo.installed(self.serac):
            for i, keep, ids in self._rows(input_ids, attention_mask):
                logits = self.serac(input_ids=ids, attention_mask=torch.ones_like(ids))
                logits = getattr(logits, "logits", logits)
                if out is None:
                    out = logits.new_zeros(*input_ids.shape, logits.shape[-1])
                out[i, keep] = logits[0].to(out.dtype)
        return SimpleNamespace(logits=out.to(input_ids.device))

    forward = __call__

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        serac, rows = self.serac, []
        with cpu_fallback(), self._classifier_memo.installed(serac):
            for _, _, ids in self._rows(input_ids, attention_mask):
                start, model, inputs = ids.shape[1], serac.model, {"input_ids": ids,
                                                                   "attention_mask": torch.ones_like(ids)}
                if len(serac.cache_inputs) > 0:
                    sims, idxs, _ = serac.run_classifier(input_ids=ids)
                    if sims.item() > 0.5:  # SERAC.generate's rule: in scope, the counterfactual model answers
                        rep = serac.build_rep_input_tokens({"input_ids": ids}, idxs, generation=True)
                        inputs = {k: rep[k].to(ids.device) for k in ("input_ids", "attention_mask")}
                        start = inputs["input_ids"].shape[1]
                        model = serac.model if serac.config.freeze_cntr else serac.replacement
                rows.append(torch.cat([ids[0], model.generate(**inputs, **kwargs)[0, start:].to(ids.device)]))
        pad = kwargs.get("pad_token_id") or 0
        width = max(len(r) for r in rows)
        return torch.stack([torch.cat([r, r.new_full((width - len(r),), pad)]) for r in rows])


class _ClassifierMemo(torch.nn.Module):
    """SERAC's scope classifier with its last few outputs remembered by input. EasyEdit's SERAC embeds its whole
    memory again on every forward and every generation (``embedding_logsim_matrix``), so scoring N edits cost N
    memory embeddings per prompt; while a view scores, the memory is fixed and its embedding is computed once.
    Exact: the same classifier in eval mode, the same tensors (outputs are only read)."""

    def __init__(self, classifier, size: int = 4):
        super().__init__()
        self.classifier, self.size = classifier, int(size)
        self._outputs: "OrderedDict[tuple, Any]" = OrderedDict()

    @staticmethod
    def _key(kwargs) -> tuple:
        return tuple((name, tuple(t.shape), t.cpu().numpy().tobytes()) for name, t in sorted(kwargs.items())
                     if torch.is_tensor(t))

    def forward(self, *args, **kwargs):
        if args or self.classifier.training or torch.is_grad_enabled():
            return self.classifier(*args, **kwargs)
        key = self._key(kwargs)
        if key not in self._outputs:
            self._outputs[key] = self.classifier(**kwargs)
            while len(self._outputs) > self.size:
                self._outputs.popitem(last=False)
        self._outputs.move_to_end(key)
        return self._outputs[key]

    @contextmanager
    def installed(self, serac):
        """``serac.classifier`` is this memo for the duration (later edits share the classifier: put it back)."""
        original = serac.classifier
        serac.classifier = self
        try:
            yield
        finally:
            serac.classifier = original


def evaluation_view(model: Any) -> Any:
    """``model`` as the bench scores it: a :class:`SeracView` of a SERAC wrapper, any other model unchanged."""
    return SeracView(model) if is_serac(model) else model
