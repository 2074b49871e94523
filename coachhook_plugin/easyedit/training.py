"""Train MEND / SERAC with EasyEdit's own trainer (``EditTrainer`` + ``MENDTrainingHparams`` / ``SERACTrainingHparams``,
``ZsreDataset`` / ``CounterFactDataset``), offline, on the CPU, into the plugin's cache folder.

    result = train_editor("MEND", "hparams/TRAINING/MEND/smollm2-135m.yaml", data="zsre", max_steps=2000)
    result["archive"]   # $COACHHOOK_CACHE/editors/MEND/smollm2-135m-zsre.pt, reused by the next call

What the plugin adds around EasyEdit's trainer (EasyEdit's training loop, losses and validation are its own):

* the data: a train split file (``zsre`` / ``counterfact``: ``../shared``'s train files; the evaluation files are
  refused) cut into train records and the last ``val_size`` records as the trainer's validation set;
* the quirks of :mod:`.learned_editors` (names, ``weights_only``, ``higher`` + transformers 5, target labels) and
  the CUDA->CPU mapping of :mod:`.devices`, all scoped to the run; the datasets' tokenizer pads on the left (EasyEdit's
  collate reads predictions from the right end, and sets left padding only for tokenizers it recognises by class
  or by 'gpt'/'llama' in their name);
* exactly ``max_steps`` training steps in both EasyEdits (PyPI's loop runs ``round(max_iters / len(train))``
  epochs, 0 when ``max_iters`` is under half an epoch: no training at all; both stop at ``max_iters - 1`` steps);
* a time estimate before the first step, a tqdm bar, one log line per validation (edit success, losses);
* the archive: EasyEdit's best-validation checkpoint (its ``early_stop_key``), with the transformers config stored as
  a dict and no optimizer state, so ``torch.load(weights_only=True)`` (torch >= 2.6's default, which EasyEdit's
  executors use) loads it; written atomically, with a ``.json`` sidecar of what was trained.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

from ..files import atomic_write, atomic_write_json
from .archives import default_archive_path, resolve_local_model
from .devices import cpu_fallback
from .hparams_files import hparams_from_config
from .imports import import_easyeditor
from .learned_editors import (LEARNED_EDITORS, family_name, functional_modulelist_slicing, model_type_of,
                              trainer_model_loading, trusted_archive_loading)
from .training_data import TrainingError, data_kind, prepare_dataset, resolve_data, split_records

LOG = logging.getLogger(__name__)

DATASET_CLASSES = {"zsre": "ZsreDataset", "counterfact": "CounterFactDataset"}
#: a training step's time / a validation step's time, per edit (time estimate only)
TRAIN_STEP_FACTOR = 2.0


def load_training_hparams(path: os.PathLike, alg: Optional[str] = None):
    """A training yaml (EasyEdit's ``hparams/TRAINING/<ALG>/*.yaml`` layout) as the installed EasyEdit's
    ``MENDTrainingHparams`` / ``SERACTrainingHparams`` (fields the class requires but the yaml lacks filled, unknown
    ones dropped, as :func:`.hparams_files.hparams_from_config` does)."""
    import yaml

    config = yaml.safe_load(Path(path).read_text()) or {}
    alg = alg or config.get("alg")
    if alg not in LEARNED_EDITORS:
        raise TrainingError(f"{path}: alg is {config.get('alg')!r}; `coachhook train` trains "
                            f"{' or '.join(LEARNED_EDITORS)}")
    if config.get("alg") != alg:
        raise TrainingError(f"{path} is a training file for {config.get('alg')!r}, not {alg}")
    ee = import_easyeditor()
    cls = getattr(ee, f"{alg}TrainingHparams", None)
    if cls is None:
        raise TrainingError(f"the installed EasyEdit has no {alg}TrainingHparams")
    hp = hparams_from_config(cls, config, source=os.fspath(path))
    if not hasattr(hp, "alg_name"):  # GitHub's CounterFactDataset.collate_gpt_fn reads config.alg_name, which the
        hp.alg_name = alg            # training classes lack (they call it alg): AttributeError otherwise
    return hp


def prepare_training_names(hp) -> Dict[str, str]:
    """Local paths for every model the trainer loads (aliases resolved), and ``model_name`` as the architecture-
    bearing name EasyEdit's MEND/SERAC dispatch on. Returns {shown name: real path} for the trainer's loader."""
    real = resolve_local_model(hp.model_name)
    hp.tokenizer_name = resolve_local_model(getattr(hp, "tokenizer_name", None) or hp.model_name)
    for field in ("small_name", "cls_name"):
        if isinstance(getattr(hp, field, None), str):
            setattr(hp, field, resolve_local_model(getattr(hp, field)))
    shown = family_name(real, model_type_of(real))
    hp.model_name = shown
    return {shown: real} if shown != real else {}


@contextlib.contextmanager
def training_context(names: Dict[str, str], run_dir: os.PathLike) -> Iterator[None]:
    """Every scoped fix EasyEdit's trainer needs here, put back afterwards."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(cpu_fallback())
        stack.enter_context(trainer_model_loading(names))
        stack.enter_context(trusted_archive_loading([run_dir]))
        stack.enter_context(functional_modulelist_slicing())
        yield


class _Steps:
    """What EasyEdit's loop sees as the training set / loader: ``steps`` batches in one "epoch", drawn from the real
    loader pass after pass (reshuffled each pass). ``len(train_set) / batch_size == steps``, so both EasyEdits run
    one epoch and stop at ``max_iters``."""

    def __init__(self, loader, steps: int, batch_size: int):
        self.loader, self.steps, self.batch_size = loader, steps, batch_size

    def __len__(self):
        return self.steps * self.batch_size

    def __iter__(self):
        produced = 0
        while True:
            for batch in self.loader:
                yield batch
                produced += 1
                if produced >= self.steps + 1:  # EasyEdit fetches one batch more than it trains on
                    return


def _floats(stats: Optional[dict]) -> dict:
    out = {}
    for k, v in (stats or {}).items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            pass
    return out


def _fmt_val(step: int, stats: dict) -> str:
    parts = [f"step {step}: validation"]
    for key, label in (("edit/acc_val", "edit success"), ("loss/edit_val", "loss/edit"), ("loss/loc_val", "loss/loc"),
                       ("loss/total_edit_val", "loss/total_edit"), ("acc/pre_val", "loc acc pre"),
                       ("acc/post_val", "loc acc post")):
        if key in stats:
            parts.append(f"{label} {stats[key]:.4f}")
    return " | ".join(parts)


def sidecar_path(archive: os.PathLike) -> Path:
    return Path(os.fspath(archive) + ".json")


def read_sidecar(archive: os.PathLike) -> dict:
    try:
        return json.loads(sidecar_path(archive).read_text())
    except (OSError, ValueError):
        return {}


def train_editor(alg: str, hparams_path: os.PathLike, *, data: str = "zsre", out: Optional[os.PathLike] = None,
                 max_steps: Optional[int] = None, val_size: int = 100, train_size: Optional[int] = None,
                 force: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train ``alg`` (MEND or SERAC) with EasyEdit's ``EditTrainer`` and write the archive (default
    ``<cache>/editors/<alg>/<hparams stem>-<data kind>.pt``). An existing archive is reused unless ``force``.
    ``max_steps`` overrides the yaml's ``max_iters`` (steps of ``batch_size`` edits). Returns a summary dict:
    archive, reused, steps, seconds, seconds_per_step, final validation, train/val sizes."""
    data_path = resolve_data(data)
    records = json.loads(Path(data_path).read_text(encoding="utf-8"))
    kind = data_kind(records)
    archive = Path(out) if out is not None else default_archive_path(alg, hparams_path, kind)
    if archive.exists() and not force:
        meta = read_sidecar(archive)
        log(f"coachhook train: reusing {archive} ({meta.get('steps', '?')} steps on {meta.get('train_records', '?')} "
            f"{meta.get('data_kind', kind)} records); --force retrains")
        return dict(meta, archive=str(archive), reused=True)

    hp = load_training_hparams(hparams_path, alg)
    names = prepare_training_names(hp)
    steps = int(max_steps if max_steps is not None else (hp.max_iters or 0))
    if steps < 1:
        raise TrainingError("nothing to train: give --max-steps N (N >= 1) or max_iters in the yaml")
    hp.max_iters, hp.max_epochs = steps + 1, None  # EasyEdit trains max_iters - 1 steps
    if hp.val_interval > steps:
        hp.val_interval = steps  # EasyEdit saves an archive only after a validation
    train, val = split_records(records, val_size, train_size)
    accumulate = max(1, int(getattr(hp, "accumulate_bs", 1) or 1))
    updates = steps // accumulate  # EasyEdit steps the optimizer every accumulate_bs training steps
    if updates == 0:
        log(f"coachhook train: warning: {steps} steps < accumulate_bs {accumulate}: the optimizer never steps, "
            f"the archive holds the untrained editor")

    archive.parent.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f".train-{alg}-", dir=archive.parent))
    try:
        for name, part in (("train.json", train), ("val.json", val)):
            (run_dir / name).write_text(json.dumps(part))
        hp.results_dir = str(run_dir)
        summary = _run(alg, hp, names, run_dir, kind, steps, progress, log)
        summary.update(data=str(data_path), data_kind=kind, train_records=len(train), val_records=len(val),
                       hparams=os.fspath(hparams_path), max_steps=steps, optimizer_updates=updates)
        _write_archive(summary.pop("checkpoint"), archive, summary)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    log(f"coachhook train: wrote {archive} ({steps} steps, {summary['seconds']:.0f} s, "
        f"final validation edit success {summary['final_validation'].get('edit/acc_val', float('nan')):.4f})")
    return dict(summary, archive=str(archive), reused=False)


def _run(alg, hp, names, run_dir, kind, steps, progress, log) -> Dict[str, Any]:
    from tqdm.auto import tqdm

    ee = import_easyeditor()
    dataset_cls = getattr(ee, DATASET_CLASSES[kind])
    seed = int(getattr(hp, "seed", 0) or 0)
    torch.manual_seed(seed)
    with training_context(names, run_dir):
        train_ds = dataset_cls(str(run_dir / "train.json"), config=hp)
        val_ds = dataset_cls(str(run_dir / "val.json"), config=hp)
        if prepare_dataset(train_ds) | prepare_dataset(val_ds):
            log("coachhook train: EasyEdit's collate_gpt_fn labels targets without their leading space; relabelled")
        trainer = ee.EditTrainer(config=hp, train_set=train_ds, val_set=val_ds)
        trainer.train_set = _Steps(trainer.train_loader, steps, hp.batch_size)
        trainer.train_loader = trainer.train_set

        # time estimate: a validation edit step (what EasyEdit's validation runs; the second one, warm), a training
        # step per edit taken as TRAIN_STEP_FACTOR x a validation step per edit (measured on SmolLM2-135M: MEND 2.18 s
        # per step of 2 edits vs 2.82 s per validation batch of 5; SERAC 15.7 s per step of 10 vs 0.72 s per 1)
        batch = next(iter(trainer.val_loader))
        trainer.edit_step(batch, training=False)
        start = time.time()
        trainer.edit_step(batch, training=False)
        per_eval = time.time() - start
        n_vals = steps // max(1, hp.val_interval)
        val_batches = min(hp.val_steps or len(val_ds), math.ceil(len(val_ds) / hp.val_batch_size))
        final_batches = math.ceil(len(val_ds) / hp.val_batch_size)
        train_factor = TRAIN_STEP_FACTOR * hp.batch_size / max(1, hp.val_batch_size)
        estimate = steps * train_factor * per_eval + (n_vals * val_batches + final_batches) * per_eval
        log(f"coachhook train {alg}: {steps} steps of {hp.batch_size} edit(s) on {len(train_ds)} {kind} records, "
            f"validation on {len(val_ds)} every {hp.val_interval} steps; estimated {estimate / 60:.1f} min "
            f"({per_eval:.2f} s per validation batch of {hp.val_batch_size}, a training step taken as "
            f"{train_factor:.1f}x that)")

        bar = tqdm(total=steps, desc=f"train {alg}", unit="step", disable=not progress)
        history: List[dict] = []
        real_train_step, real_validate = trainer.train_step, trainer.validate
        t_train = {"s": 0.0}

        def train_step(batch):
            t0 = time.time()
            info = real_train_step(batch)
            t_train["s"] += time.time() - t0
            bar.update(1)
            bar.set_postfix({"loss": f"{float(info.get('loss/total_edit', float('nan'))):.3f}",
                             "edit acc": f"{float(info.get('edit/acc', float('nan'))):.2f}"}, refresh=False)
            return info

        def validate(*args, **kwargs):
            stats = real_validate(*args, **kwargs)
            step = int(getattr(trainer, "global_iter", 0))
            if stats is not None:
                final = bool(kwargs.get("log"))  # EasyEdit's final validation (all batches, best archive)
                history.append(dict(_floats(stats), step=step, final=final))
                line = _fmt_val(step, _floats(stats))
                if final:
                    line = line.replace(f"step {step}: validation", "final validation (best archive)")
                (bar.write if progress else log)(line)
            return stats

        trainer.train_step, trainer.validate = train_step, validate
        start = time.time()
        try:
            trainer.run()
        finally:
            bar.close()
        seconds = time.time() - start
    checkpoint = Path(trainer.save_path)
    if not checkpoint.exists():
        raise TrainingError(f"EasyEdit's trainer wrote no archive ({checkpoint}); it saves one after a validation")
    final = {}
    results = run_dir / "results.json"
    if results.exists():
        final = _floats(json.loads(results.read_text()).get("results"))
    elif history:
        final = history[-1]
    return dict(checkpoint=checkpoint, steps=steps, seconds=seconds, train_seconds=t_train["s"],
                seconds_per_step=t_train["s"] / steps, estimated_seconds=estimate, validations=history,
                final_validation=final, alg=alg)


def _write_archive(checkpoint: Path, archive: Path, summary: dict) -> None:
    """EasyEdit's checkpoint -> the archive: config as a dict, no optimizer state (``weights_only``-loadable)."""
    obj = torch.load(checkpoint, map_location="cpu", weights_only=False)  # the file this run just wrote
    model = obj["model"]
    cfg = model.get("model_config")
    if cfg is not None and not isinstance(cfg, dict):
        model["model_config"] = cfg.to_dict()
    out = {"model": model, "opt": None, "lr_opt": None, "val_stats": _floats(obj.get("val_stats")),
           "start_time": str(obj.get("start_time")), "elapsed_time": float(obj.get("elapsed_time") or 0.0),
           "step": int(obj.get("step") or 0),
           "coachhook": {k: v for k, v in summary.items() if k not in ("validations",)}}
    out["coachhook"] = json.loads(json.dumps(out["coachhook"], default=str))
    atomic_write(archive, lambda tmp: torch.save(out, tmp))
    atomic_write_json(sidecar_path(archive), dict(json.loads(json.dumps(summary, default=str)), archive=str(archive),
                                                  best_step=out["step"]))
