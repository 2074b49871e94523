"""The edit-time comparison measures both methods on the same model and leaves the model as it found it."""
import torch

from coachhook_plugin import get_state
from coachhook_plugin.speed import edit_time
from coachhook_plugin.stats import ensure_stats
from conftest import build_tiny, tiny_hparams
from easyedit_helpers import GPT2_LAYOUT


def test_edit_time_split_and_model_restored(gpt2_tok, ee, tmp_path):
    model = build_tiny("gpt2")
    model.config._name_or_path = "tiny-gpt2-speed"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = dict(stats_dir=str(tmp_path), mom2_dataset="corpus", mom2_n_samples=20, mom2_dtype="float32")
    hp = tiny_hparams("gpt2", mom2_update_weight=1e-2, context_templates=["{}"], mom2_adjustment=True, **stats)
    ensure_stats(model, gpt2_tok, hp, [f"Sentence {i} mentions a town, a river and a person." for i in range(20)])
    memit = ee.MEMITHyperParams(alg_name="MEMIT", model_name="tiny-gpt2-speed", layers=[1, 2], layer_selection="all",
                                fact_token="subject_last", v_num_grad_steps=8, v_lr=0.5, v_loss_layer=3,
                                v_weight_decay=1e-3, clamp_norm_factor=4, kl_factor=0.0625, mom2_adjustment=True,
                                mom2_update_weight=1e-2, **stats, device="cpu", batch_size=4, max_length=40,
                                model_parallel=False, **GPT2_LAYOUT)
    records = [dict(prompt=p, subject=s, target_new=t, ground_truth="x") for p, s, t in [
        ("The capital of Zorbia is", "Zorbia", "Paris"), ("Alice Moreau works as a", "Alice Moreau", "pilot")]]
    res = edit_time(model, gpt2_tok, hp, memit, records)
    split = res["coachhook_split_seconds"]
    from coachhook_plugin.speed import PHASES
    assert split.keys() == set(PHASES) | {"other"} and all(split[p] > 0 for p in PHASES)
    total = res["coachhook_seconds_per_edit"] * 2
    assert abs(sum(split.values()) - total) < 1e-6 and split["other"] >= 0
    assert res["memit_seconds_per_edit"] > 0 and res["ratio"] > 0
    assert get_state(model) is None  # hooks detached
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # MEMIT's writes undone
