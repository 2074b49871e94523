"""`coachhook train MEND|SERAC`: EasyEdit's own trainer on a tiny random Llama, the archive it writes, and that
archive editing through EasyEdit's `BaseEditor` (issue #17, the mechanics; no real model here).

The tiny models are saved to local folders (EasyEdit's trainer loads by path): a 2-layer Llama with the real GPT-2
tokenizer (in a folder whose name says nothing about the architecture), and for SERAC a 2-layer random BERT as the
scope classifier ('bert' in its folder name, as EasyEdit's SERAC needs). Training uses the first records of the
shared ZsRE train split.
"""
import json
import os
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import build_tiny, shared_path

REPO = Path(__file__).resolve().parents[1]
PROMPT, TARGET, SUBJECT = "The capital of Zorbia is", "Paris", "Zorbia"
STEPS = {"MEND": 6, "SERAC": 6}

COMMON = dict(model_class="LlamaForCausalLM", tokenizer_class="GPT2Tokenizer", archive=None, cedit=0.1, cloc=1.0,
              cbase=1.0, dropout=0.0, train_base=False, no_grad_layers=None, results_dir="./results", device="cpu",
              silent=True, max_iters=1000, log_interval=100, val_interval=3, early_stop_patience=30000,
              early_stop_key="edit/acc_val", eval_only=False, half=False, debug=False, save=False, final_eval=True,
              accumulate_bs=2, val_steps=2, opt="Adam", grad_clip=100.0, model_save_pt=5000)
MEND = dict(COMMON, alg="MEND",
            inner_params=["model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"],
            lr=1e-4, edit_lr=1e-3, lr_lr=1e-4, seed=42, one_sided=False, n_hidden=1, hidden_dim=None, init="id",
            norm=True, combine=True, x_only=False, delta_only=False, act="relu", rank=1920, mlp_class="IDMLP",
            shared=True, batch_size=2, val_batch_size=2, eval_log_interval=100, verbose=False)
SERAC = dict(COMMON, alg="SERAC", inner_params=[], lr=1e-4, edit_lr=1e-2, seed=0, lr_lr=0.0, supervised=False,
             soft_weighting=False, checkpoint_grad=False, cross_attend=False, cos=False, freeze=None, square=True,
             bound_embeds=False, use_all_negatives=False, freeze_cntr=False, dist_heads=1, lora=None, batch_size=1,
             val_batch_size=1, edit_bs=1, log_errors=False, unlikelihood=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny model folders, a private cache folder, and the training yamls."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("train")
    tok_dir = shared_path("tokenizers", "gpt2")
    data = shared_path("data", "zsre", "zsre_mend_train-1k.json")
    # a folder name without 'llama'/'gpt' (like SmolLM2's cache folder): EasyEdit's MEND/SERAC dispatch on such
    # substrings, so this exercises the plugin's architecture-bearing name ("... (llama)") and left padding
    llama, bert = root / "tiny-model", root / "tiny-bert"
    build_tiny("llama", n_layer=2, hidden=32, init_range=0.3).save_pretrained(llama)  # context-sensitive
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tok.save_pretrained(llama)
    torch.manual_seed(0)
    classifier = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=128))
    with torch.no_grad():  # a random classifier that puts every input in scope: its last LayerNorm outputs a constant
        classifier.encoder.layer[-1].output.LayerNorm.weight.zero_()
    classifier.save_pretrained(bert)
    tok.pad_token = tok.sep_token = tok.eos_token
    tok.save_pretrained(bert)
    yamls = {}
    for alg, cfg in (("MEND", MEND), ("SERAC", SERAC)):
        cfg = dict(cfg, model_name=str(llama), tokenizer_name=str(llama))
        if alg == "SERAC":
            cfg.update(small_name=str(llama), cls_name=str(bert), cls_class="AutoModel")
        yamls[alg] = root / "TRAINING" / alg / "tiny-llama.yaml"
        yamls[alg].parent.mkdir(parents=True)
        yamls[alg].write_text(yaml.safe_dump(cfg))
    old = os.environ.get("COACHHOOK_CACHE")
    os.environ["COACHHOOK_CACHE"] = str(root / "cache")
    try:
        yield dict(root=root, llama=llama, yamls=yamls, data=data)
    finally:
        if old is None:
            os.environ.pop("COACHHOOK_CACHE", None)
        else:
            os.environ["COACHHOOK_CACHE"] = old


@pytest.fixture(scope="module")
def trained(env):
    """Each editor trained once, a few steps, with EasyEdit's EditTrainer (`train_editor`)."""
    from coachhook_plugin.easyedit.training import train_editor

    out, lines = {}, []
    for alg in ("MEND", "SERAC"):
        start = time.time()
        result = train_editor(alg, env["yamls"][alg], data="zsre", max_steps=STEPS[alg], val_size=4, train_size=24,
                              progress=False, log=lines.append)
        out[alg] = dict(result, wall=time.time() - start)
    out["lines"] = lines
    return out


def _edit_hparams(env, alg, archive):
    from coachhook_plugin.easyedit.hparams_files import load_easyedit_hparams

    cfg = yaml.safe_load(env["yamls"][alg].read_text())
    cfg.update(alg_name=alg, archive=str(archive), lr_scale=1.0)
    path = env["root"] / f"{alg}-edit-{Path(str(archive)).stem}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_easyedit_hparams(path)


def _target_logprob(model, tok):
    """log P(" Paris" | prompt), teacher forced, under the plugin's CPU mapping (PyPI SERAC keeps 'cuda:cpu')."""
    from coachhook_plugin.easyedit import cpu_fallback

    ids = tok(f"{PROMPT} {TARGET}", return_tensors="pt")
    n = len(tok(f" {TARGET}")["input_ids"])
    with torch.no_grad(), cpu_fallback():
        out = model(**ids)
    logits = out.logits if hasattr(out, "logits") else out
    return logits[0, -n - 1:-1].log_softmax(-1).gather(-1, ids["input_ids"][0, -n:, None]).sum().item()


def _edit_once(env, alg, archive):
    """(log-prob before, log-prob after) of the edited answer, one edit through BaseEditor.edit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from coachhook_plugin.easyedit import consecutive_edit_kwargs, make_editor

    model = AutoModelForCausalLM.from_pretrained(env["llama"]).eval()
    tok = AutoTokenizer.from_pretrained(env["llama"])
    tok.pad_token = tok.eos_token
    before = _target_logprob(model, tok)
    editor = make_editor(_edit_hparams(env, alg, archive), model, tok)
    _, edited, _ = editor.edit(prompts=[PROMPT], target_new=[TARGET], subject=[SUBJECT], **consecutive_edit_kwargs())
    return before, _target_logprob(edited, tok)


# ------------------------------------------------------------------------------------------------ training

@pytest.mark.easyedit
@pytest.mark.parametrize("alg", ["MEND", "SERAC"])
def test_easyedit_trainer_writes_an_archive_and_reuses_it(env, trained, alg):
    from coachhook_plugin.easyedit.training import train_editor

    res = trained[alg]
    archive = Path(res["archive"])
    assert archive == env["root"] / "cache" / "editors" / alg / "tiny-llama-zsre.pt"
    assert not res["reused"] and res["steps"] == STEPS[alg] and res["train_records"] == 24 and res["val_records"] == 4
    assert res["validations"], "no validation was logged"
    assert "edit/acc_val" in res["final_validation"]
    # torch >= 2.6's default weights_only=True (what EasyEdit's executors use) loads it: config stored as a dict
    obj = torch.load(archive, map_location="cpu", weights_only=True)
    assert isinstance(obj["model"]["model_config"], dict) and obj["opt"] is None
    assert obj["coachhook"]["steps"] == STEPS[alg]
    side = json.loads(Path(f"{archive}.json").read_text())
    assert side["data_kind"] == "zsre" and side["max_steps"] == STEPS[alg] and side["optimizer_updates"] == 3
    assert not list(archive.parent.glob(".train-*")), "the run folder was not cleaned up"
    assert any(f"coachhook train {alg}: {STEPS[alg]} steps" in line and "estimated" in line
               for line in trained["lines"])
    # a second call reuses the archive (no training: the file is untouched)
    mtime, lines = archive.stat().st_mtime_ns, []
    again = train_editor(alg, env["yamls"][alg], data="zsre", max_steps=STEPS[alg], log=lines.append)
    assert again["reused"] and again["archive"] == str(archive) and archive.stat().st_mtime_ns == mtime
    assert "reusing" in lines[0]


@pytest.mark.easyedit
def test_counterfact_train_split_trains_too(env, tmp_path):
    from coachhook_plugin.easyedit.training import train_editor

    res = train_editor("MEND", env["yamls"]["MEND"], data="counterfact", max_steps=2, val_size=2, train_size=8,
                       out=tmp_path / "cf.pt", progress=False, log=lambda line: None)
    assert res["data_kind"] == "counterfact" and res["data"].endswith("counterfact-train.json")
    assert torch.load(tmp_path / "cf.pt", weights_only=True)["coachhook"]["train_records"] == 8


@pytest.mark.easyedit
def test_datasets_pad_left_and_label_the_tokens_the_model_sees(env):
    """EasyEdit's collate must label the target tokens the model is fed, left-padded (PyPI labels the target without
    its leading space; GitHub pads on the right for a tokenizer whose folder name says neither 'gpt' nor 'llama')."""
    from coachhook_plugin.easyedit import import_easyeditor
    from coachhook_plugin.easyedit.learned_editors import labels_match_inputs
    from coachhook_plugin.easyedit.training import load_training_hparams
    from coachhook_plugin.easyedit.training_data import prepare_dataset

    ee = import_easyeditor()
    hp = load_training_hparams(env["yamls"]["MEND"], "MEND")
    ds = ee.ZsreDataset(str(env["data"]), size=3, config=hp)
    prepare_dataset(ds)
    assert ds.tok.padding_side == "left" and ds.tok.pad_token_id is not None
    assert all(labels_match_inputs(ds, ds[i]) for i in range(3))
    batch = ds.collate_gpt_fn([ds[0], ds[1]])["edit_inner"]
    assert bool(batch["attention_mask"][:, -1].all()), "not left-padded"


@pytest.mark.easyedit
@pytest.mark.parametrize("alg", ["MEND", "SERAC"])
def test_shipped_smollm2_training_yamls_load(alg):
    from coachhook_plugin.easyedit.training import load_training_hparams

    hp = load_training_hparams(REPO / "hparams" / "TRAINING" / alg / "smollm2-135m.yaml", alg)
    assert hp.alg == alg and hp.model_name == "smollm2-135m" and hp.archive is None and hp.max_iters > 0
    if alg == "SERAC":
        assert hp.small_name == "smollm2-135m" and hp.cls_name == "all-minilm-l6-v2"


# ------------------------------------------------------------------------------------------------ editing

@pytest.mark.easyedit
def test_mend_archive_loads_in_base_editor_and_changes_the_answer(env, trained):
    archive = Path(trained["MEND"]["archive"])
    before, after = _edit_once(env, "MEND", archive)
    assert abs(after - before) > 1e-4, "the trained MEND edit did not change the edited answer"
    # the same archive with its learned edit step sizes set to 0: the edit must change nothing. If BaseEditor
    # ignored the archive (a fresh MEND), this edit would move the answer like the first one.
    obj = torch.load(archive, map_location="cpu", weights_only=True)
    obj["model"]["edit_lrs"] = torch.zeros_like(obj["model"]["edit_lrs"])
    zero = env["root"] / "mend-zero-lr.pt"
    torch.save(obj, zero)
    before0, after0 = _edit_once(env, "MEND", zero)
    assert before0 == pytest.approx(before, abs=1e-6)
    assert after0 == pytest.approx(before0, abs=1e-6), "the archive was not loaded"
    # an archive as EasyEdit's own trainer writes it (the transformers config object inside, which torch >= 2.6's
    # default weights_only=True refuses) loads too: what `archive: <path>` to an archive trained elsewhere needs
    from transformers import AutoConfig

    obj = torch.load(archive, map_location="cpu", weights_only=True)
    obj["model"]["model_config"] = AutoConfig.from_pretrained(env["llama"])
    easyedit_made = env["root"] / "mend-easyedit-format.pt"
    torch.save(obj, easyedit_made)
    with pytest.raises(Exception):
        torch.load(easyedit_made, weights_only=True)
    assert _edit_once(env, "MEND", easyedit_made)[1] == pytest.approx(after, abs=1e-5)


@pytest.mark.easyedit
def test_serac_archive_loads_in_base_editor_and_changes_the_answer(env, trained):
    archive = Path(trained["SERAC"]["archive"])
    before, after = _edit_once(env, "SERAC", archive)
    # the tiny classifier puts the edit in scope: the counterfactual model answers, with the edit as context
    assert abs(after - before) > 0.3, "the trained SERAC edit did not change the edited answer"
    obj = torch.load(archive, map_location="cpu", weights_only=True)
    # (1) the archive's counterfactual model answers: the same archive with its output layer scaled answers otherwise.
    # A SERAC that ignored the archive would answer with small_name's weights both times.
    sharp = dict(obj, model=dict(obj["model"]))
    sharp["model"]["replacement.lm_head.weight"] = 3 * obj["model"]["replacement.lm_head.weight"]
    torch.save(sharp, env["root"] / "serac-sharp.pt")
    _, after_sharp = _edit_once(env, "SERAC", env["root"] / "serac-sharp.pt")
    assert abs(after_sharp - after) > 0.05, "the archive's counterfactual model was not loaded"
    # (2) the archive's scope classifier decides: the same archive with the classifier's last LayerNorm restored (a
    # random encoder that tells inputs apart) and a large distance scale puts nothing in scope, and the answer is the
    # base model's (up to the eps SERAC adds to every probability: ~0.02 here). A SERAC that ignored the archive
    # would keep small_name's everything-in-scope classifier and route to the counterfactual model.
    key = "classifier.encoder.layer.1.output.LayerNorm.weight"
    model = dict(obj["model"], scale=torch.tensor(1e6), **{key: torch.ones_like(obj["model"][key])})
    out_of_scope = dict(obj, model=model)
    torch.save(out_of_scope, env["root"] / "serac-out-of-scope.pt")
    before0, after0 = _edit_once(env, "SERAC", env["root"] / "serac-out-of-scope.pt")
    assert after0 == pytest.approx(before0, abs=0.05), "the archive's scope classifier was not loaded"


@pytest.mark.easyedit
@pytest.mark.parametrize("alg", ["MEND", "SERAC"])
def test_missing_archive_is_one_sentence_naming_the_command(env, alg, tmp_path, monkeypatch):
    from coachhook_plugin.easyedit import make_editor
    from coachhook_plugin.easyedit.archives import MissingArchiveError
    from coachhook_plugin.easyedit.hparams_files import load_easyedit_hparams

    monkeypatch.setenv("COACHHOOK_CACHE", str(tmp_path / "empty-cache"))
    hp = load_easyedit_hparams(REPO / "hparams" / alg / "smollm2-135m.yaml")
    with pytest.raises(MissingArchiveError) as err:
        make_editor(hp)  # raised before any model is loaded
    msg = str(err.value)
    assert msg.count(". ") == 0 and msg.endswith(".")
    assert f"`coachhook train {alg} --hparams hparams/TRAINING/{alg}/smollm2-135m.yaml --data zsre`" in msg
    assert str(tmp_path / "empty-cache" / "editors" / alg / "smollm2-135m-zsre.pt") in msg


@pytest.mark.easyedit
def test_cli_train_reuses_and_reports_errors(env, trained, capsys):
    from coachhook_plugin.cli import main

    assert main(["train", "MEND", "--hparams", str(env["yamls"]["MEND"]), "--data", "zsre", "--max-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "reusing" in out and out.strip().endswith("tiny-llama-zsre.pt")
    evaluation = shared_path("data", "zsre", "zsre_mend_eval-1200.json")
    assert main(["train", "SERAC", "--hparams", str(env["yamls"]["SERAC"]), "--data", str(evaluation)]) == 2
    assert "evaluation split" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the scoped fixes

def test_family_name_and_cache_paths(monkeypatch, tmp_path):
    from coachhook_plugin.easyedit.archives import default_archive_path, expand_cache_path, train_command
    from coachhook_plugin.easyedit.learned_editors import family_name

    assert family_name("smollm2-135m", "llama") == "smollm2-135m (llama)"
    assert family_name("/x/tiny-llama", "llama") == "/x/tiny-llama"
    assert family_name("gpt2-xl", "gpt2") == "gpt2-xl"
    assert family_name("my-model", "qwen2") == "my-model"  # not a family EasyEdit's MEND/SERAC know: unchanged
    monkeypatch.setenv("COACHHOOK_CACHE", str(tmp_path))
    assert expand_cache_path("$COACHHOOK_CACHE/editors/MEND/a.pt") == f"{tmp_path}/editors/MEND/a.pt"
    assert expand_cache_path("${COACHHOOK_CACHE}/b.pt") == f"{tmp_path}/b.pt"
    assert expand_cache_path("$COACHHOOK_CACHEX/b.pt") == "$COACHHOOK_CACHEX/b.pt"
    path = default_archive_path("SERAC", "hparams/TRAINING/SERAC/smollm2-135m.yaml", "counterfact")
    assert path == tmp_path / "editors" / "SERAC" / "smollm2-135m-counterfact.pt"
    assert train_command("SERAC", path) == ("coachhook train SERAC --hparams hparams/TRAINING/SERAC/smollm2-135m.yaml "
                                            "--data counterfact")
    assert "--out /elsewhere/m.pt" in train_command("MEND", "/elsewhere/m.pt")


def test_trusted_loading_is_scoped_to_the_named_files(tmp_path):
    from transformers import LlamaConfig

    from coachhook_plugin.easyedit.learned_editors import trusted_archive_loading

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    for p in (a, b):
        torch.save({"model_config": LlamaConfig()}, p)
    real = torch.load
    with trusted_archive_loading([a]):
        assert isinstance(torch.load(a)["model_config"], LlamaConfig)
        with pytest.raises(Exception):
            torch.load(b)  # not named: torch's default (weights_only=True) refuses the config object
    assert torch.load is real


def test_functional_modulelist_slicing_is_scoped():
    higher = pytest.importorskip("higher")
    from coachhook_plugin.easyedit.learned_editors import functional_modulelist_slicing

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(3, 3) for _ in range(3)])

        def forward(self, x):
            for layer in self.layers[:2]:  # what transformers-5 Llama does
                x = layer(x)
            return x

    net, x = Net(), torch.randn(1, 3)
    fnet = higher.patch.monkeypatch(net, copy_initial_weights=True)
    with pytest.raises(TypeError):
        fnet(x)
    real = torch.nn.ModuleList.__getitem__
    with functional_modulelist_slicing():
        assert torch.allclose(fnet(x), net(x))
        assert type(net.layers[:2]) is torch.nn.ModuleList
    assert torch.nn.ModuleList.__getitem__ is real
