"""Scoring the records on the model *as it is now* — every call reads the live model, nothing is cached
between calls except the pre-edit locality reference (taken once on the base model).

Two backends with EasyEdit's definitions:
* ``plugin`` (default): :mod:`coachhook_plugin.evaluate`, EasyEdit's ``compute_edit_quality`` metrics
  computed in batches (teacher-forced token accuracy of the target after the prompt = reliability, after
  the rephrase = generality; locality = share of the locality answer's argmax tokens equal to the pre-edit
  model's), plus the target's mean token probability (a continuous view of reliability);
* ``easyedit``: EasyEdit's own ``compute_edit_quality``, one record at a time (slower; no probability).
Both add generative reliability when asked: greedy decoding with the KV cache contains the target.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .. import evaluate as ev
from .data import easyedit_request

METRICS = ("reliability", "generality", "locality")
SCORE_CHUNK_BATCHES = 8  # evaluation batches per step of the scoring progress bar


class Evaluator:
    def __init__(self, backend: str = "plugin", generative: bool = True, batch_size: int = 16,
                 max_new_tokens: int = 8):
        if backend not in ("plugin", "easyedit"):
            raise ValueError(f"eval.backend must be 'plugin' or 'easyedit', not {backend!r}")
        self.backend, self.generative = backend, bool(generative)
        self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)
        self.reference: Dict[int, object] = {}  # record index → pre-edit locality tokens

    # ------------------------------------------------------------------ the base model, once
    def take_reference(self, model, tok, records: Sequence[Dict], hparams=None, model_name: str = "") -> None:
        if self.backend == "plugin":
            refs = ev.locality_reference(model, tok, records)
        else:
            refs = [self._easyedit(model, tok, r, hparams, model_name)["locality"]["neighborhood_output"]
                    for r in records]
        self.reference = {r["index"]: ref for r, ref in zip(records, refs)}

    # ------------------------------------------------------------------ the live model
    def score(self, model, tok, records: Sequence[Dict], hparams=None, model_name: str = "",
              progress: Optional[Callable] = None, desc: str = "scoring") -> List[Dict]:
        """One dict per record: reliability, generality, locality, target_prob (plugin backend) and
        generative_reliability (when enabled). ``progress`` (a tqdm-like wrapper) shows the records scored so far;
        they are scored in chunks of whole evaluation batches, so every batch is the one it would be without."""
        if not records:
            return []
        missing = [r["index"] for r in records if r["index"] not in self.reference]
        if missing:
            raise RuntimeError(f"no pre-edit locality reference for records {missing[:5]}: call take_reference "
                               f"on the base model first")
        step = self.batch_size * SCORE_CHUNK_BATCHES
        chunks = [records[s:s + step] for s in range(0, len(records), step)]
        if progress is not None:
            chunks = progress(chunks, desc=f"{desc} ({len(records)} records, {step} per step)", leave=False)
        return [row for chunk in chunks for row in self._score_chunk(model, tok, chunk, hparams, model_name)]

    def _score_chunk(self, model, tok, records: Sequence[Dict], hparams, model_name: str) -> List[Dict]:
        if self.backend == "plugin":
            rows = self._plugin(model, tok, records)
        else:
            rows = [self._easyedit_row(model, tok, r, hparams, model_name) for r in records]
        if self.generative:
            hits = ev.generation_contains(model, tok, [r["prompt"] for r in records],
                                          [r["target_new"] for r in records], max_new_tokens=self.max_new_tokens)
            for row, h in zip(rows, hits):
                row["generative_reliability"] = float(h)
        return rows

    def _plugin(self, model, tok, records):
        bs = self.batch_size
        rel_tok, rel_prob = ev.answer_token_scores(model, tok, [r["prompt"] for r in records],
                                                   [r["target_new"] for r in records], bs)
        gen = ev.token_accuracy(model, tok, [r["rephrase_prompt"] for r in records],
                                [r["target_new"] for r in records], bs)
        loc_now = ev.answer_predictions(model, tok, [r["locality_prompt"] for r in records],
                                        [r["locality_ground_truth"] for r in records], bs)
        loc = ev.agreement([self.reference[r["index"]] for r in records], loc_now)
        rows = []
        for r, pred, prob, g, l in zip(records, rel_tok, rel_prob, gen, loc):
            _, answer = ev._join(tok, r["prompt"], r["target_new"])
            rows.append({"index": r["index"], "reliability": float((pred == torch.tensor(answer)).float().mean()),
                         "generality": float(g), "locality": float(l), "target_prob": float(prob.mean())})
        return rows

    def _easyedit(self, model, tok, rec, hparams, model_name):
        from easyeditor.evaluate import compute_edit_quality

        from ..easyedit.patches import editing_context

        with editing_context():
            return compute_edit_quality(model, model_name, hparams, tok, easyedit_request(rec), hparams.device)

    def _easyedit_row(self, model, tok, rec, hparams, model_name):
        out = self._easyedit(model, tok, rec, hparams, model_name)
        now = out["locality"]["neighborhood_output"]
        return {"index": rec["index"], "reliability": float(np.mean(out["rewrite_acc"])),
                "generality": float(np.mean(out["rephrase_acc"])),
                "locality": float(np.mean(np.equal(now, self.reference[rec["index"]])))}


def summarise(rows: Sequence[Dict]) -> Dict[str, float]:
    """Means over records; ``average`` is the mean of reliability, generality and locality (paper's Table 2)."""
    out: Dict[str, float] = {}
    for key in METRICS + ("generative_reliability", "target_prob"):
        vals = [row[key] for row in rows if row.get(key) is not None]
        if vals:
            out[key] = float(np.mean(vals))
    if all(k in out for k in METRICS):
        out["average"] = float(np.mean([out[k] for k in METRICS]))
    return out


def weighted_mean(parts: Sequence[Dict[str, float]], sizes: Sequence[int]) -> Dict[str, float]:
    keys = set().union(*parts) if parts else set()
    total = float(sum(sizes))
    return {k: float(sum(p[k] * n for p, n in zip(parts, sizes) if k in p) / total) for k in sorted(keys)}
