"""The paper's protocols, for one method. Every score is taken on the model state at that moment.

* ``single_round`` (Table 1): each batch edited into the base model, scored, rolled back;
* ``consecutive`` (Table 2, Fig. 4): batches accumulate; at every checkpoint all edits made so far are
  scored on the state *at that checkpoint*; the final entry scores all N after the last batch;
* ``immediate``: each batch scored right after it is applied, no roll-back (reported on its own).
"""
from __future__ import annotations

import logging
import random
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from .evaluation import Evaluator, summarise, weighted_mean

LOG = logging.getLogger(__name__)
PROTOCOLS = ("single_round", "consecutive", "immediate")


def checkpoint_set(num_edits: int, every: Optional[int], extra: Iterable[int] = ()) -> List[int]:
    points = set(int(x) for x in extra if 0 < int(x) <= num_edits)
    if every:
        points.update(range(int(every), num_edits + 1, int(every)))
    points.add(num_edits)
    return sorted(points)


def checkpoint_records(records: Sequence[Dict], sample: Optional[int], seed: int) -> List[Dict]:
    """The records scored at an intermediate checkpoint: all of them, or a sample of `sample` drawn with `seed`
    (kept in edit order) — on long runs, scoring every edit so far at every checkpoint costs more than editing."""
    if not sample or len(records) <= int(sample):
        return list(records)
    picked = sorted(random.Random(seed + len(records)).sample(range(len(records)), int(sample)))
    return [records[i] for i in picked]


def weights_fingerprint(model) -> float:
    """A cheap checksum of every parameter (float64 sums), to check that a roll-back really restored."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum() + p.detach().double().abs().sum() for p in model.parameters()))


class MethodRun:
    """Edits (with per-record fall-back on failure), timings and scores of one method under one protocol."""

    def __init__(self, runner, evaluator: Evaluator, progress: Callable = None,
                 checkpoint_sample: Optional[int] = None, seed: int = 0):
        self.runner, self.evaluator = runner, evaluator
        # consecutive: score at most this many of the edits so far at a checkpoint before the last (a seeded
        # sample, the same for every method); None: all of them. The final entry always scores all N.
        self.checkpoint_sample, self.seed = checkpoint_sample, int(seed)
        self.progress = progress or (lambda it, **kw: it)
        self.edit_seconds = 0.0
        self.eval_seconds = 0.0
        self.failures: List[Dict] = []
        self.curve: List[Dict] = []
        self.per_record: List[Dict] = []
        self.notes: List[str] = []

    # ---------------------------------------------------------------- editing
    def _apply(self, records: List[Dict], single_round: bool) -> List:
        """Write one batch; returns the roll-back handles, oldest first. A method EasyEdit cannot batch
        (ROME, KN) is given the records one call each, as ``BaseEditor.edit`` gives them."""
        start = time.perf_counter()
        try:
            if len(records) > 1 and not self.runner.batchable:
                return self._apply_one_at_a_time(records, single_round)
            try:
                return self.runner.edit(records, single_round)
            except Exception as exc:  # noqa: BLE001 — reported per record below, never skipped silently
                LOG.warning("%s: a batch of %d edit(s) failed", self.runner.key, len(records), exc_info=True)
                if len(records) == 1:
                    self.failures.append({"index": records[0]["index"], "error": f"{type(exc).__name__}: {exc}"})
                    return []
                # find the record(s) at fault: write the batch one record at a time
                self.notes.append(f"a batch of {len(records)} failed ({type(exc).__name__}: {exc}); its records "
                                  f"were written one at a time")
                return self._apply_one_at_a_time(records, single_round, batch_error=exc)
        finally:
            self.edit_seconds += time.perf_counter() - start

    def _apply_one_at_a_time(self, records: List[Dict], single_round: bool, batch_error=None) -> List:
        handles = []
        for rec in records:
            try:
                handles.extend(self.runner.edit([rec], single_round))
            except Exception as one:  # noqa: BLE001
                LOG.warning("%s: edit of record %s failed", self.runner.key, rec["index"], exc_info=True)
                failure = {"index": rec["index"], "error": f"{type(one).__name__}: {one}"}
                if batch_error is not None:
                    failure["batch_error"] = f"{type(batch_error).__name__}: {batch_error}"
                self.failures.append(failure)
        return handles

    def _score(self, records: List[Dict], edits: int) -> Dict:
        start = time.perf_counter()
        r = self.runner
        rows = self.evaluator.score(r.model, r.tok, records, hparams=r.hparams, model_name=r.editor.model_name,
                                    progress=self.progress, desc=f"{r.key} scoring after {edits} edits")
        self.eval_seconds += time.perf_counter() - start
        summary = summarise(rows)
        self.curve.append({"edits": edits, "scored": len(records), **summary})
        self.per_record.append({"edits": edits, "records": rows})
        return summary

    # ---------------------------------------------------------------- protocols
    def run(self, protocol: str, records: List[Dict], batch_size: int, checkpoints: Sequence[int]) -> Dict:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
        batches = [records[s:s + batch_size] for s in range(0, len(records), batch_size)]
        bar = self.progress(batches, desc=f"{self.runner.key} batches", leave=False)
        if protocol == "consecutive":
            return self._consecutive(bar, records, checkpoints)
        return self._per_batch(bar, single_round=protocol == "single_round")

    def _consecutive(self, batches, records, checkpoints) -> Dict:
        pending, done = list(checkpoints), 0
        for batch in batches:
            self._apply(batch, single_round=False)
            done += len(batch)
            if pending and done >= pending[0]:  # the first batch boundary at or after the checkpoint
                while pending and done >= pending[0]:
                    pending.pop(0)
                last = done >= len(records)
                self._score(records[:done] if last else checkpoint_records(records[:done], self.checkpoint_sample,
                                                                           self.seed), done)
        return {k: v for k, v in self.curve[-1].items() if k not in ("edits", "scored")}

    def _per_batch(self, batches, single_round: bool) -> Dict:
        parts, sizes, done = [], [], 0
        base = weights_fingerprint(self.runner.model) if single_round else None
        for batch in batches:
            handles = self._apply(batch, single_round=single_round)
            done += len(batch)
            parts.append(self._score(batch, done))
            sizes.append(len(batch))
            if single_round:
                for h in reversed(handles):
                    self.runner.roll_back(h)
                if weights_fingerprint(self.runner.model) != base:
                    raise RuntimeError(f"{self.runner.key}: roll-back after a single-round batch did not restore "
                                       f"the base weights; this method's weights_copy is incomplete")
        return weighted_mean(parts, sizes)
