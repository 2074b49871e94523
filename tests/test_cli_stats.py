"""`coachhook stats` writes files that EasyEdit's own layer_stats loads (no download), from a corpus or from
text sampled from the model."""
import numpy as np
import pytest
import torch
import yaml

from coachhook_plugin import CoachHooKHyperParams, cli
from coachhook_plugin.stats import load_second_moment, path_for, sample_texts
from conftest import build_tiny, tiny_hparams


@pytest.fixture
def tiny_checkpoint(tmp_path, gpt2_tok):
    ckpt = tmp_path / "tiny-gpt2"
    build_tiny("gpt2").save_pretrained(ckpt)
    gpt2_tok.save_pretrained(ckpt)
    fields = tiny_hparams("gpt2", mom2_adjustment=True, mom2_dataset="localtext", mom2_n_samples=6,
                          stats_dir=str(tmp_path / "stats")).to_dict()
    fields["model_name"] = str(ckpt)
    hp_path = tmp_path / "hp.yaml"
    hp_path.write_text(yaml.safe_dump(fields))
    return ckpt, hp_path


def test_cli_stats_from_corpus_is_read_by_easyedit_layer_stats(tiny_checkpoint, tmp_path, ee, capsys):
    from coachhook_plugin.easyedit import editing_context
    from coachhook_plugin.models import load_model_and_tokenizer
    from easyeditor.models.rome.layer_stats import layer_stats

    ckpt, hp_path = tiny_checkpoint
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Paragraph number {i} talks about rivers, mountains and the cities near them."
                                for i in range(10)))
    assert cli.main(["stats", "--hparams", str(hp_path), "--corpus", str(corpus)]) == 0
    hp = CoachHooKHyperParams.from_hparams(hp_path)
    model, tok = load_model_and_tokenizer(str(ckpt))
    name = hp.rewrite_module_tmp.format(1)
    ours = load_second_moment(path_for(model, hp, name), 64 * 4)
    with editing_context():
        stat = layer_stats(model, tok, name, hp.stats_dir, hp.mom2_dataset, to_collect=["mom2"],
                           sample_size=hp.mom2_n_samples, precision=hp.mom2_dtype, hparams=hp)
    theirs = stat.mom2.moment().double()
    assert torch.allclose(theirs, ours, rtol=1e-5, atol=1e-7)
    assert str(path_for(model, hp, name)) in capsys.readouterr().out


def test_sampled_text_is_seeded(gpt2_tok):
    model = build_tiny("gpt2")
    a = sample_texts(model, gpt2_tok, 3, max_new_tokens=8, seed=1, progress=False)
    b = sample_texts(model, gpt2_tok, 3, max_new_tokens=8, seed=1, progress=False)
    c = sample_texts(model, gpt2_tok, 3, max_new_tokens=8, seed=2, progress=False)
    assert a == b and a != c and len(a) == 3
