"""`coachhook edit`: a data file applied consecutively in batches, with an atomic checkpoint after every batch, and
`--resume` after an interruption (a batch is applied exactly once). Checkpoints are state files
(`persistence.save_coachhook`) whose header also records the run's progress.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

from .files import atomic_write_json
from .hparams import CoachHooKHyperParams
from .method import get_state
from .persistence import hparams_json, load_coachhook, read_header, save_coachhook

PathLike = Union[str, os.PathLike]


STATE_FILE, PROGRESS_FILE = "state.safetensors", "progress.json"
RUN_IGNORED_HPARAMS = ("model_name", "device", "verbose", "undo_depth")  # may change between a run and its resume


class RunError(ValueError):
    """A consecutive run cannot start or resume as asked; nothing was edited."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def edit_run(hparams: Union[PathLike, CoachHooKHyperParams], data: PathLike, out: PathLike,
             num_edits: Optional[int] = None, batch_size: Optional[int] = None, model_name: Optional[str] = None,
             resume: bool = False, log: Callable[[str], None] = print, model_and_tok=None) -> Dict[str, Any]:
    """Apply the requests of `data` consecutively in batches, checkpointing after every completed batch.

    Checkpoint = `out/state.safetensors` (save_coachhook, atomic) whose header also records the run's progress
    (batches done, their request ids, the plan); it is the commit point. `out/progress.json` (atomic) mirrors
    it for people and tools, written right after. `resume=True` continues after the last checkpoint: the plan
    (data file hash, batch size, request ids per batch) and the hparams must be the ones of the run, the base
    model must match the saved fingerprint; a batch is applied exactly once. Returns the final progress."""
    from .edit_requests import load_requests, prepare_requests
    from .method import _check_lengths, apply_coachhook_to_model
    from .models import load_model_and_tokenizer

    hp = hparams if isinstance(hparams, CoachHooKHyperParams) else CoachHooKHyperParams.from_hparams(hparams)
    if model_name is not None:
        hp.model_name = model_name
    if batch_size is not None:
        hp.batch_size = batch_size
    hp.validate()
    data, out = Path(data), Path(out)
    requests = load_requests(data, num_edits)
    if not requests:
        raise RunError(f"{data} holds no edit records")
    batches = [requests[i:i + hp.batch_size] for i in range(0, len(requests), hp.batch_size)]
    plan = {"data": str(data.resolve()), "data_sha256": _sha256_file(data), "num_edits": len(requests),
            "batch_size": hp.batch_size, "total_batches": len(batches),
            "request_ids": [[r["case_id"] for r in b] for b in batches]}
    state_path, progress_path = out / STATE_FILE, out / PROGRESS_FILE
    header = None
    if state_path.exists() or progress_path.exists():
        if not resume:
            raise RunError(f"{out} already holds a run ({state_path.name} / {progress_path.name}); pass --resume "
                           f"(resume=True) to continue it, or choose another --out")
        if not state_path.exists():
            raise RunError(f"{progress_path} exists but {state_path} does not: the checkpoint is incomplete; delete "
                           f"{out} to start over")
        header = read_header(state_path)
        run = header.get("extra", {}).get("edit_run")
        if not isinstance(run, dict):
            raise RunError(f"{state_path} was not written by `coachhook edit`; choose another --out")
        changed = [k for k in plan if k != "data" and json.loads(json.dumps(plan[k])) != run.get(k)]
        if changed:
            raise RunError(f"cannot resume {out}: {', '.join(changed)} differ from the interrupted run's; resume "
                           f"with the same data file, --num-edits and --batch-size, or choose another --out")
        now, before = hparams_json(hp), header["hparams"]
        # a field the interrupted run's version did not have yet ran with its default
        defaults = {f.name: f.default for f in dataclasses.fields(CoachHooKHyperParams)
                    if f.default is not dataclasses.MISSING}
        changed = sorted(k for k in set(now) | set(before)
                         if k not in RUN_IGNORED_HPARAMS and now.get(k) != before.get(k, defaults.get(k)))
        if changed:
            raise RunError(f"cannot resume {out}: hparams {', '.join(changed)} differ from the interrupted run's; "
                           f"resume with the same hparams file")

    model, tok = model_and_tok if model_and_tok is not None else load_model_and_tokenizer(hp.model_name)
    hp.validate_for_model(model)
    for b, batch in enumerate(batches):  # every batch is checked before the first edit
        try:
            _check_lengths(tok, prepare_requests(batch), hp)
        except ValueError as e:
            raise type(e)(f"batch {b + 1} (case_ids {plan['request_ids'][b]}): {e}") from e

    done = 0
    if header is not None:
        state = load_coachhook(model, state_path, hparams=hp)
        done = int(header["extra"]["edit_run"]["batches_done"])
        if state.step != done:
            raise RunError(f"{state_path} is inconsistent (step {state.step}, {done} batches recorded); delete "
                           f"{out} to start over")
        log(f"resuming {out}: {done}/{len(batches)} batches done")
    progress = None
    for b in range(done, len(batches)):
        start = time.time()
        apply_coachhook_to_model(model, tok, batches[b], hp, progress=None)
        progress = dict(plan, batches_done=b + 1, done_ids=plan["request_ids"][:b + 1],
                        complete=b + 1 == len(batches))
        save_coachhook(model, state_path, extra={"edit_run": progress})  # the commit point
        atomic_write_json(progress_path, dict(progress, state_file=STATE_FILE, step=get_state(model).step))
        log(f"checkpoint {b + 1}/{len(batches)}: case_ids {plan['request_ids'][b]} "
            f"({time.time() - start:.1f} s)")
    if progress is None:  # nothing left to do: make sure the mirror is current
        progress = dict(header["extra"]["edit_run"])
        atomic_write_json(progress_path, dict(progress, state_file=STATE_FILE, step=header["step"]))
        log(f"{out}: all {len(batches)} batches already done")
    return progress


__all__ = ["edit_run", "RunError", "STATE_FILE", "PROGRESS_FILE"]
