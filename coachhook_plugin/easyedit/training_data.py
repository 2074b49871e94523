"""The data ``coachhook train`` gives EasyEdit's trainer: the shared train splits (never the evaluation files), cut
into train and validation records, and EasyEdit's datasets made right for a decoder-only model."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

from .learned_editors import fix_target_labels


class TrainingError(RuntimeError):
    """Something about a training run the user can fix; the message says how."""


#: the train split files in the shared data folder, per data kind (never the evaluation files)
TRAIN_FILES = {"zsre": ("data", "zsre", "zsre_mend_train-1k.json"),
               "counterfact": ("data", "counterfact", "counterfact-train.json")}
EVALUATION_FILES = ("zsre_mend_eval-1200.json", "counterfact-edit.json")


def shared_dir() -> Path:
    env = os.environ.get("COACHHOOK_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared"


def data_kind(records: List[dict]) -> str:
    """'zsre' (MEND format: src/alt/answers/loc) or 'counterfact' (EasyEdit's prompt/target_new/... format)."""
    first = records[0] if records else {}
    if {"src", "alt", "loc"} <= set(first):
        return "zsre"
    if {"prompt", "target_new", "locality_prompt"} <= set(first):
        return "counterfact"
    raise TrainingError("the training data is neither ZsRE (MEND format: src, alt, answers, loc, loc_ans) nor "
                        "CounterFact (EasyEdit format: prompt, target_new, ..., locality_prompt) records")


def resolve_data(data: str) -> Path:
    """``zsre`` / ``counterfact`` -> the shared train split; a path is used as is (evaluation files refused)."""
    if data in TRAIN_FILES:
        path = shared_dir().joinpath(*TRAIN_FILES[data])
        if not path.exists():
            raise TrainingError(f"{path} not found: set COACHHOOK_SHARED to the shared data folder")
        return path
    path = Path(data)
    if path.name in EVALUATION_FILES:
        raise TrainingError(f"{path.name} is an evaluation split; train on {TRAIN_FILES['zsre'][-1]} or "
                            f"{TRAIN_FILES['counterfact'][-1]} (--data zsre / --data counterfact)")
    if not path.exists():
        raise TrainingError(f"no data file {path}")
    return path


def split_records(records: list, val_size: int, train_size: Optional[int]):
    """The last ``val_size`` records for validation, the rest (the first ``train_size``) for training."""
    if len(records) < 2:
        raise TrainingError("the training data needs at least 2 records")
    val_size = max(1, min(val_size, len(records) - 1))
    train, val = records[:-val_size], records[-val_size:]
    if train_size is not None:
        train = train[:max(1, train_size)]
    return train, val


def prepare_dataset(ds) -> bool:
    """An EasyEdit ``ZsreDataset`` / ``CounterFactDataset`` made right for training a decoder-only model: its
    tokenizer pads on the left with a pad token (EasyEdit's ``collate_gpt_fn`` reads predictions from the right end,
    ``pred[:, -len(target):]``, but sets left padding only for tokenizers it recognises: PyPI by class, GitHub by
    'gpt'/'llama' in the name; SmolLM2's cache folder has neither and its tokenizer pads on the right), and its
    labels are the target tokens the model is fed (:func:`.learned_editors.fix_target_labels`). Returns whether the
    labels needed fixing."""
    if ds.tok.pad_token_id is None:
        ds.tok.pad_token_id = ds.tok.eos_token_id
    ds.tok.padding_side = "left"
    return fix_target_labels(ds)
