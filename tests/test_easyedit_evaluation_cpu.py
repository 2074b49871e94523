"""EasyEdit's public evaluation functions called by user code after editing, with `hparams.device` as an EasyEdit
user spells it ("cpu" in GitHub EasyEdit's hparams, an int in EasyEdit's examples), on a machine without a GPU."""
import pytest
import torch

import easyedit_helpers as H

pytestmark = [pytest.mark.easyedit,
              pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine EasyEdit's own functions run")]

RECORD = {"prompt": "The capital of France", "target_new": "Rome", "ground_truth": "Paris",
          "rephrase_prompt": "France's capital city",
          "locality": {"neighborhood": {"prompt": "The capital of Spain", "ground_truth": "Madrid"}}}


@pytest.mark.parametrize("device", ["cpu", 0])
def test_compute_edit_quality_runs_on_cpu_after_import(ee, device):
    import coachhook_plugin  # noqa: F401  (registration patches EasyEdit's evaluation functions)
    from easyeditor.evaluate import compute_edit_quality
    from easyeditor import compute_locality_quality, compute_rewrite_or_rephrase_quality

    from coachhook_plugin import CoachHooKHyperParams
    from coachhook_plugin.easyedit import compat

    model, tok = H.tiny_model()
    hp = CoachHooKHyperParams(model_name="tiny", layers=[1], device=device, **H.GPT2_LAYOUT)
    out = compute_edit_quality(model, "tiny-gpt2", hp, tok, RECORD, device)
    assert len(out["rewrite_acc"]) == 1 and len(out["rephrase_acc"]) == 1
    # the same numbers as the plugin's own evaluation of EasyEdit's metric: token accuracy of " Rome"
    from coachhook_plugin.evaluate import token_accuracy

    assert float(sum(out["rewrite_acc"]) / len(out["rewrite_acc"])) == pytest.approx(
        token_accuracy(model, tok, [RECORD["prompt"]], [RECORD["target_new"]], 1)[0])
    assert compute_rewrite_or_rephrase_quality(model, "tiny-gpt2", hp, tok, RECORD["prompt"], "Rome",
                                               device)["rewrite_acc"] == out["rewrite_acc"]
    loc = compute_locality_quality(model, "tiny-gpt2", hp, tok, "neighborhood", "The capital of Spain", "Madrid",
                                   device)
    assert loc["neighborhood_output"] == out["locality"]["neighborhood_output"]
    # without the plugin's scope EasyEdit builds f"cuda:{device}", which a CPU-only torch refuses
    compat.uninstall()
    try:
        from easyeditor.evaluate import compute_edit_quality as unpatched

        assert unpatched is not compute_edit_quality
        if device == "cpu" and compat.easyeditor_module("easyeditor.util.device") is not None:
            unpatched(model, "tiny-gpt2", hp, tok, RECORD, device)  # GitHub EasyEdit maps "cpu" itself
        else:
            with pytest.raises((RuntimeError, AssertionError)):  # "Invalid device string" / "not compiled with CUDA"
                unpatched(model, "tiny-gpt2", hp, tok, RECORD, device)
    finally:
        compat.install()
    from easyeditor.evaluate import compute_edit_quality as again

    assert again.__wrapped__ is unpatched  # re-installed: one wrapper around EasyEdit's function, never two
