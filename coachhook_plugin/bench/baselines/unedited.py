"""The reference row: the base model, never edited. Its scores are what every editor starts from (for example
MEND's and SERAC's reliability must be judged against the base model's on the same records).

It goes through the same dispatch, protocols and evaluator as every method, so its row is scored exactly like
theirs; ``apply`` changes nothing and returns a restore callable that has nothing to restore.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, List, Tuple

import torch

from ._common import BaselineHyperParams

ALG_NAME = "Unedited"


@dataclass
class UneditedHyperParams(BaselineHyperParams):
    ALG_NAME: ClassVar[str] = ALG_NAME


def _nothing_to_restore() -> None:
    return None


def apply_unedited_to_model(model, tok, requests: List[Dict], hparams: UneditedHyperParams, copy: bool = False,
                            return_orig_weights: bool = False, keep_original_weight: bool = False,
                            **kwargs) -> Tuple[torch.nn.Module, Callable[[], None]]:
    """EasyEdit's apply contract, writing nothing: the model comes back as it went in."""
    return model, _nothing_to_restore
