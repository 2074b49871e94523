"""MEND and SERAC as bench rows (issue #17, item 3): archives trained a few steps with EasyEdit's trainer
(`train_editor`) on a tiny random Llama, then `coachhook bench methods=[MEND,SERAC]` under each protocol, the
`method_settings.<name>.archive=` override, and SERAC's memory carried over (consecutive) and emptied (roll-back).

Mechanics only: a 6-step editor is untrained, so no score is asserted beyond 'in [0, 1]'.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import LAYOUTS, build_tiny, shared_path  # noqa: E402
from test_bench import write_tiny_data  # noqa: E402
from test_training_mend_serac import MEND as MEND_TRAINING, SERAC as SERAC_TRAINING  # noqa: E402

pytestmark = pytest.mark.easyedit  # also run against GitHub EasyEdit


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama (GPT-2 tokenizer) and BERT classifier, MEND and SERAC archives trained 6 steps each, and bench
    hparams: MEND's names a missing archive (the tests pass the real one with archive=), SERAC's the real one."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from coachhook_plugin.easyedit.training import train_editor

    root = tmp_path_factory.mktemp("bench-learned")
    llama, bert = root / "tiny-model", root / "tiny-bert"
    build_tiny("llama", n_layer=2, hidden=32, init_range=0.3).save_pretrained(llama)
    tok = AutoTokenizer.from_pretrained(str(shared_path("tokenizers", "gpt2")))
    tok.save_pretrained(llama)
    torch.manual_seed(0)
    classifier = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=128))
    with torch.no_grad():  # a classifier that puts every input in scope (its last LayerNorm outputs a constant)
        classifier.encoder.layer[-1].output.LayerNorm.weight.zero_()
    classifier.save_pretrained(bert)
    tok.pad_token = tok.sep_token = tok.eos_token
    tok.save_pretrained(bert)
    hp_dir, archives = root / "hparams", {}
    for alg, cfg in (("MEND", MEND_TRAINING), ("SERAC", SERAC_TRAINING)):
        cfg = dict(cfg, model_name=str(llama), tokenizer_name=str(llama))
        if alg == "SERAC":
            cfg.update(small_name=str(llama), cls_name=str(bert), cls_class="AutoModel")
        training = root / "TRAINING" / alg / "tiny.yaml"
        training.parent.mkdir(parents=True)
        training.write_text(yaml.safe_dump(cfg))
        archives[alg] = root / "archives" / f"{alg}.pt"
        train_editor(alg, training, data="zsre", max_steps=6, val_size=4, train_size=24, out=archives[alg],
                     progress=False, log=lambda line: None)
        named = root / "elsewhere" / "missing.pt" if alg == "MEND" else archives[alg]
        (hp_dir / alg).mkdir(parents=True)
        (hp_dir / alg / "tiny.yaml").write_text(yaml.safe_dump(dict(cfg, alg_name=alg, archive=str(named),
                                                                    lr_scale=1.0)))
    (hp_dir / "CoachHooK").mkdir()  # beside them in one bench run (no covariance statistics: a quick one)
    (hp_dir / "CoachHooK" / "tiny.yaml").write_text(yaml.safe_dump(dict(
        alg_name="CoachHooK", model_name="tiny", layers=[1], **LAYOUTS["llama"], mom2_adjustment=False,
        mom2_update_weight=1.0, v_num_grad_steps=8, v_lr=0.5, context_templates=["{}"], device="cpu", batch_size=2)))
    data = write_tiny_data(root / "tiny-counterfact.json")
    return dict(root=root, llama=llama, hp_dir=hp_dir, archives=archives, data=data)


def bench(setup, out, methods, protocol, *extra):
    from coachhook_plugin.bench import main

    args = [f"data={setup['data']}", f"methods=[{','.join(methods)}]", "num_edits=4", "batch_size=2",
            f"protocol={protocol}", f"model={setup['llama']}", "model.hparams_name=tiny", f"out={out}",
            f"hparams_dir={setup['hp_dir']}", "progress=false", "eval.max_new_tokens=3",
            "shared_context_templates=false", *extra]
    assert main(args) == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("protocol", ["consecutive", "single_round", "immediate"])
def test_mend_and_serac_rows(setup, tmp_path, protocol):
    methods = ["CoachHooK", "MEND", "SERAC"] if protocol == "consecutive" else ["MEND", "SERAC"]
    res = bench(setup, tmp_path / protocol, methods, protocol,
                f"method_settings.MEND.archive={setup['archives']['MEND']}")
    assert list(res["methods"]) == methods
    for name in methods:
        assert "error" not in res["methods"][name], res["methods"][name].get("error")
    for name in ("MEND", "SERAC"):
        m = res["methods"][name]
        assert not m["failed_edits"], m["failed_edits"]
        assert m["label"] == name and m["alg_name"] == name
        assert [p["edits"] for p in m["curve"]] == ([4] if protocol == "consecutive" else [2, 4])
        for key in ("reliability", "generality", "locality", "generative_reliability"):
            assert 0.0 <= m["final"][key] <= 1.0
        assert m["hparams_values"]["archive"] == str(setup["archives"][name])  # MEND: the override


def test_archive_override_and_missing_archive(setup, tmp_path):
    """Without the override MEND's hparams name a missing archive; a wrong override too: one sentence naming the
    `coachhook train` command, in the row's error (the other rows run)."""
    res = bench(setup, tmp_path / "no-override", ["MEND"], "immediate")
    err = res["methods"]["MEND"]["error"]
    assert err.startswith("MissingArchiveError: no trained MEND archive at ") and "missing.pt" in err
    assert "`coachhook train MEND --hparams hparams/TRAINING/MEND/<model>.yaml --out " in err
    wrong = tmp_path / "nowhere" / "serac.pt"
    res = bench(setup, tmp_path / "wrong", ["SERAC", "MEND"], "immediate", f"method_settings.SERAC.archive={wrong}",
                f"method_settings.MEND.archive={setup['archives']['MEND']}")
    assert f"no trained SERAC archive at {wrong}: build it with `coachhook train SERAC" in \
        res["methods"]["SERAC"]["error"]
    assert "error" not in res["methods"]["MEND"], res["methods"]["MEND"].get("error")


def _runner(setup, alg):
    from omegaconf import OmegaConf

    from coachhook_plugin.bench.methods import MethodRunner, register_bench_methods
    from coachhook_plugin.easyedit import editor

    register_bench_methods()
    settings = OmegaConf.create(dict(label=alg, alg_name=alg, hparams=None, hparams_folder=alg, overrides={},
                                     archive=str(setup["archives"][alg])))
    runner = MethodRunner(alg, settings, setup["hp_dir"] / alg / "tiny.yaml", str(setup["llama"]))
    model, tok = editor.load_model_and_tokenizer(str(setup["llama"]))
    runner.start(model, tok)
    return runner


def _records(setup):
    from coachhook_plugin.bench.data import load_records

    return load_records(setup["data"], 4)[0]


def test_serac_memory_accumulates_and_roll_back_empties_it(setup):
    from coachhook_plugin.bench.protocols import weights_fingerprint
    from coachhook_plugin.easyedit import serac_memory

    runner, records = _runner(setup, "SERAC"), _records(setup)
    base, base_print = runner.model, weights_fingerprint(runner.model)
    runner.edit(records[:2], single_round=False)
    runner.edit(records[2:], single_round=False)
    assert len(serac_memory.memory(runner.editor.model)[0]) == 4, "consecutive SERAC must remember every edit"
    view = runner.model
    assert isinstance(view, serac_memory.SeracView) and weights_fingerprint(view) == base_print
    # the view scores right-padded batches row by row: the same as each row alone, and SERAC's answer, not the base's
    runner.tok.padding_side = "right"
    ids = runner.tok([records[0]["prompt"], records[1]["prompt"] + " and more words"], return_tensors="pt",
                     padding=True)
    logits, n = view(**ids).logits, int(ids["attention_mask"][0].sum())
    assert logits.shape[:2] == ids["input_ids"].shape
    alone = view(input_ids=ids["input_ids"][:1, :n]).logits
    assert torch.allclose(logits[0, :n], alone[0], atol=1e-5)
    with torch.no_grad():
        plain = base(input_ids=ids["input_ids"][:1, :n]).logits.log_softmax(-1)
    assert not torch.allclose(alone[0, -1].log_softmax(-1), plain[0, -1], atol=1e-3), "SERAC's memory was not used"
    out = view.generate(input_ids=ids["input_ids"][:1, :n], do_sample=False, max_new_tokens=3,
                        pad_token_id=runner.tok.eos_token_id)
    assert out.shape[1] > n and torch.equal(out[0, :n], ids["input_ids"][0, :n])  # prompt, then the new tokens
    # single round from the base model: each batch alone in memory, rolled back to the base model, memory empty
    runner.editor.model = base
    serac_memory.set_executor_memory(runner.editor.apply_algo, base)
    for batch in (records[:2], records[2:]):
        handles = runner.edit(batch, single_round=True)
        inputs = serac_memory.memory(runner.editor.model)[0]
        assert len(inputs) == 2 and all(r["prompt"] in i for r, i in zip(batch, inputs))
        for h in reversed(handles):
            runner.roll_back(h)
        assert runner.model is base and weights_fingerprint(runner.model) == base_print
        assert serac_memory.executor_memory(runner.editor.apply_algo) == ([], [])


def test_mend_edits_weights_in_place_and_roll_back_restores_them(setup):
    from coachhook_plugin.bench.protocols import weights_fingerprint

    runner, records = _runner(setup, "MEND"), _records(setup)
    model, base_print = runner.model, weights_fingerprint(runner.model)
    handles = runner.edit(records[:2], single_round=True)
    assert runner.model is model and weights_fingerprint(model) != base_print, "the MEND edit changed no weight"
    for h in reversed(handles):
        runner.roll_back(h)
    assert weights_fingerprint(model) == base_print
    runner.edit(records[:2], single_round=False)  # consecutive: the second batch edits the edited weights
    first = weights_fingerprint(model)
    runner.edit(records[2:], single_round=False)
    assert runner.model is model and weights_fingerprint(model) not in (base_print, first)


def test_serac_view_embeds_the_memory_once_and_scores_exactly_as_serac(setup):
    """EasyEdit's SERAC embeds its whole memory on every forward; the view remembers the classifier's output while
    it scores. Same log-probabilities and generations as SERAC itself, the memory embedded once for several
    prompts, and the shared classifier put back afterwards (later edits use it)."""
    from coachhook_plugin.easyedit import serac_memory
    from coachhook_plugin.easyedit.devices import cpu_fallback

    runner, records = _runner(setup, "SERAC"), _records(setup)
    runner.edit(records, single_round=False)
    serac = runner.editor.model
    classifier, calls = serac.classifier, []
    handle = classifier.register_forward_hook(lambda m, a, kw_out: calls.append(1))
    try:
        prompts = [r["prompt"] for r in records]
        with torch.no_grad(), cpu_fallback():
            direct = []
            for p in prompts:
                ids = runner.tok(p, return_tensors="pt")["input_ids"]
                direct.append(serac(input_ids=ids, attention_mask=torch.ones_like(ids)))
        per_prompt_direct = len(calls) / len(prompts)
        assert per_prompt_direct == 2  # EasyEdit: the memory and the prompt, every time
        calls.clear()
        view = runner.model
        for p, want in zip(prompts, direct):
            ids = runner.tok(p, return_tensors="pt")["input_ids"]
            got = view(input_ids=ids).logits
            assert torch.equal(got[0], getattr(want, "logits", want)[0].to(got.dtype))
        assert len(calls) == len(prompts) + 1  # the memory once, then each prompt
        assert serac.classifier is classifier
        ids = runner.tok(prompts[0], return_tensors="pt")["input_ids"]
        fresh = serac_memory.SeracView(serac)
        kw = dict(do_sample=False, max_new_tokens=3, pad_token_id=runner.tok.eos_token_id)
        assert torch.equal(view.generate(input_ids=ids, **kw), fresh.generate(input_ids=ids, **kw))
    finally:
        handle.remove()
