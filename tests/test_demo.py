"""The demo's built-in edit set is well-formed, and the demo runs end to end (tiny model, both methods)."""
import json

import pytest
import torch
import yaml

from coachhook_plugin import demo
from conftest import build_tiny
from easyedit_helpers import GPT2_LAYOUT


def test_builtin_edits_are_well_formed():
    edits = demo.builtin_edits()
    assert len(edits) >= 30
    keys = {"subject", "prompt", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
            "locality_ground_truth"}
    seen = set()
    for e in edits:
        assert keys <= set(e), e
        assert all(isinstance(e[k], str) and e[k].strip() == e[k] and e[k] for k in keys), e
        assert e["subject"] in e["prompt"] and e["subject"] in e["rephrase_prompt"], e
        assert e["rephrase_prompt"] != e["prompt"]
        assert e["target_new"].lower() != e["ground_truth"].lower(), e
        assert e["subject"] not in e["locality_prompt"], e  # unrelated to the edit
        assert e["prompt"] not in seen
        seen.add(e["prompt"])
    with pytest.raises(demo.DemoError, match="--num-edits must be between 1 and"):
        demo.builtin_edits(len(edits) + 1)


def _write_hparams(path, alg, model_dir, stats_dir, **extra):
    hp = dict(alg_name=alg, model_name=str(model_dir), stats_dir=str(stats_dir), device="cpu", layers=[1, 2],
              **GPT2_LAYOUT, fact_token="subject_last", v_num_grad_steps=10, v_lr=0.5, v_loss_layer=3,
              v_weight_decay=1e-3, clamp_norm_factor=4, kl_factor=0.0625, mom2_adjustment=True,
              mom2_update_weight=10, mom2_dataset="corpus", mom2_n_samples=20, mom2_dtype="float32",
              batch_size=2, max_length=40, model_parallel=False, **extra)
    path.write_text(yaml.safe_dump(hp))
    return path


def test_demo_end_to_end_on_a_tiny_model(tmp_path, gpt2_tok, ee):
    model_dir = tmp_path / "tiny"
    build_tiny("gpt2", init_range=0.3).save_pretrained(model_dir)
    gpt2_tok.save_pretrained(model_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Sentence number {i} is about a city, a river and a famous person." for i in range(20)))
    stats = tmp_path / "stats"
    ch = _write_hparams(tmp_path / "ch.yaml", "CoachHooK", model_dir, stats, context_templates=["{}"])
    mm = _write_hparams(tmp_path / "mm.yaml", "MEMIT", model_dir, stats, layer_selection="all")
    out = tmp_path / "out"
    res = demo.run_demo(num_edits=4, model=str(model_dir), device="cpu", batch_size=2, out=str(out),
                        hparams=str(ch), memit_hparams=str(mm), corpus=str(corpus))
    saved = json.loads((out / "results.json").read_text())
    assert saved["methods"].keys() == {"pre-edit", "CoachHooK", "MEMIT (EasyEdit)"}
    assert (out / "results.png").stat().st_size > 1000
    assert saved["base_model_restored_bit_for_bit"] is True
    for row in saved["methods"].values():
        assert all(0.0 <= row[m] <= 1.0 for m in demo.METRICS)
        assert len(row["generations"]) == 3
    # both methods wrote into the same statistics files, computed once from the corpus (each file is also
    # linked under the other EasyEdit's model folder name: a local path names it differently in PyPI and GitHub)
    assert len({p.stat().st_ino for p in stats.rglob("*.npz")}) == 2
    # a random 4-layer model cannot learn these multi-token facts; that the edits happened shows in the
    # state (two consecutive batches) and in the unrelated prompts that moved (the quality is measured on
    # SmolLM2 by the demo itself)
    assert saved["coachhook_batches"] == 2
    assert saved["methods"]["pre-edit"]["locality"] == 1.0
    assert saved["methods"]["MEMIT (EasyEdit)"]["locality"] < 1.0
    report = demo.format_report(res, str(out))
    assert "CoachHooK" in report and "MEMIT (EasyEdit)" in report and str(out / "results.json") in report
