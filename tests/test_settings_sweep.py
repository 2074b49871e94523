"""examples/smollm2_settings_sweep.py: settings are chosen on the train splits (issue 16). It refuses the
evaluation files unless told, reads both formats, takes the alpha_rule options; run here on a tiny model."""
import json
from pathlib import Path

import pytest
import yaml

from conftest import LAYOUTS, build_tiny, load_example, shared_path


def _sweep():
    return load_example("smollm2_settings_sweep")


def test_defaults_are_the_train_splits():
    mod = _sweep()
    assert mod.TRAIN_FILES == {"counterfact": "data/counterfact/counterfact-train.json",
                               "zsre": "data/zsre/zsre_mend_train-1k.json"}
    assert set(mod.EVAL_FILES) == {"counterfact-edit.json", "zsre_mend_eval-1200.json"}


@pytest.mark.parametrize("name", ["counterfact/counterfact-edit.json", "zsre/zsre_mend_eval-1200.json"])
def test_an_evaluation_file_is_refused_with_the_fix(name, capsys):
    with pytest.raises(SystemExit) as exc:
        _sweep().main(["--data", str(Path("/nowhere/data") / name)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "is an evaluation split" in err and "counterfact-train.json" in err and "--allow-eval-split" in err


@pytest.mark.parametrize("dataset", ["counterfact", "zsre"])
def test_runs_on_a_tiny_model_with_the_recomputed_rule(dataset, gpt2_tok, tmp_path, monkeypatch, capsys):
    shared_path("data", dataset)
    mod = _sweep()
    model = build_tiny("gpt2")  # 128 positions: statistics from short sentences instead of WikiText paragraphs
    monkeypatch.setattr("coachhook_plugin.models.load_model_and_tokenizer", lambda name: (model, gpt2_tok))
    monkeypatch.setattr("coachhook_plugin.stats.read_corpus",
                        lambda path, max_texts: [f"Short sentence number {i} about the weather." for i in range(8)])
    hp = dict(alg_name="CoachHooK", model_name="tiny-gpt2", layers=[1, 2], **LAYOUTS["gpt2"], device="cpu",
              mom2_update_weight=1e-2, v_num_grad_steps=2, context_templates=["{}"], stats_dir=str(tmp_path / "st"),
              mom2_n_samples=4, mom2_dataset="wikitext-2-raw-test")
    (tmp_path / "hp.yaml").write_text(yaml.safe_dump(hp))
    out = tmp_path / "sweep.jsonl"
    mod.main(["--hparams", str(tmp_path / "hp.yaml"), "--dataset", dataset, "--n", "4", "--batch", "2",
              "--alpha-rule", "recomputed", "--alpha-margin", "0.5", "--alpha-prompts-max", "all",
              "--checkpoints", "2", "--out", str(out)])
    line = json.loads(out.read_text().splitlines()[-1])
    assert line["data"].endswith(mod.TRAIN_FILES[dataset]) and line["eval_split"] is False
    assert (line["alpha_rule"], line["alpha_margin"], line["alpha_prompts_max"]) == ("recomputed", 0.5, None)
    assert line["n"] == 4 and set(line["checkpoints"]) == {"2"} and "locality" in line["checkpoints"]["2"]
    assert set(line["post"]) == {"reliability", "generality", "locality", "generative_reliability"}


def test_a_bad_alpha_option_fails_before_the_model_loads(monkeypatch):
    from coachhook_plugin import HyperParamsError

    def no_model(name):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr("coachhook_plugin.models.load_model_and_tokenizer", no_model)
    with pytest.raises(HyperParamsError, match="only applies with alpha_rule: recomputed"):
        _sweep().main(["--alpha-margin", "0.5", "--data", "/nowhere/counterfact-train.json"])


def test_rescoring_at_other_key_scope_cosines(gpt2_tok, tmp_path, monkeypatch):
    """--rescore-cosines scores the final state again with each threshold: at the hparams' own threshold the
    teacher-forced scores are the run's own, and a threshold no paraphrase reaches changes generality."""
    shared_path("data", "counterfact")
    mod = _sweep()
    model = build_tiny("gpt2")
    monkeypatch.setattr("coachhook_plugin.models.load_model_and_tokenizer", lambda name: (model, gpt2_tok))
    monkeypatch.setattr("coachhook_plugin.stats.read_corpus",
                        lambda path, max_texts: [f"Short sentence number {i} about the weather." for i in range(8)])
    hp = dict(alg_name="CoachHooK", model_name="tiny-gpt2", layers=[1, 2], **LAYOUTS["gpt2"], device="cpu",
              mom2_update_weight=1e-2, v_num_grad_steps=4, v_lr=0.5, context_templates=["{}"],
              stats_dir=str(tmp_path / "st"), mom2_n_samples=4, mom2_dataset="wikitext-2-raw-test",
              key_scope_cosine=0.5)
    (tmp_path / "hp.yaml").write_text(yaml.safe_dump(hp))
    out = tmp_path / "sweep.jsonl"
    mod.main(["--hparams", str(tmp_path / "hp.yaml"), "--n", "6", "--batch", "3",
              "--rescore-cosines", "0.5,-0.99,1.0", "--out", str(out)])
    line = json.loads(out.read_text().splitlines()[-1])
    post, rescored = line["post"], line["rescored"]
    assert set(rescored) == {"0.5", "-0.99", "1.0"} and line["key_scope_cosine"] == 0.5
    assert rescored["0.5"] == {k: post[k] for k in ("reliability", "generality", "locality")}
    # cosine 1.0: only a token whose key is an edited key itself may swap, so no paraphrase keeps a swap;
    # -0.99: the key test passes everything, the gate alone decides
    assert rescored["1.0"]["generality"] <= rescored["0.5"]["generality"] <= rescored["-0.99"]["generality"]
    assert rescored["1.0"] != rescored["-0.99"]


@pytest.mark.parametrize("args", [["--no-key-scope", "--rescore-cosines", "0.6"], ["--rescore-cosines", "0.6,1.5"]])
def test_bad_rescoring_fails_before_the_model_loads(args, monkeypatch, capsys):
    monkeypatch.setattr("coachhook_plugin.models.load_model_and_tokenizer",
                        lambda name: (_ for _ in ()).throw(AssertionError("the model must not be loaded")))
    with pytest.raises(SystemExit) as exc:
        _sweep().main(args + ["--data", "/nowhere/counterfact-train.json"])
    assert exc.value.code == 2 and "--rescore-cosines" in capsys.readouterr().err
