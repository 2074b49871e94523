"""The default model's cache: converted once, atomically, reused; clear errors for a broken cache or bad name.

The GGUF load is replaced by a tiny random Llama so the conversion code itself (config clean-up, fresh
model, save, rename) runs in a second instead of the real 20 s dequantisation.
"""
import errno
import os

import pytest
import torch
import transformers

from coachhook_plugin import models
from conftest import build_tiny


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path, gpt2_tok):
    monkeypatch.setenv("COACHHOOK_CACHE", str(tmp_path / "cache"))
    gguf_dir = tmp_path / "pkg"
    gguf_dir.mkdir()
    (gguf_dir / models._GGUF_FILE).write_bytes(b"not a real gguf")
    monkeypatch.setattr(models, "_gguf_path", lambda: gguf_dir / models._GGUF_FILE)
    tiny = build_tiny("llama")
    tiny.config.quantization_config = {"quant_method": "gguf"}  # what the GGUF loader leaves behind
    calls = {"model": 0}
    real_model_fp, real_tok_fp = transformers.AutoModelForCausalLM.from_pretrained, \
        transformers.AutoTokenizer.from_pretrained

    def model_fp(path, *a, gguf_file=None, **k):
        if gguf_file is not None:
            calls["model"] += 1
            return tiny
        return real_model_fp(path, *a, **k)

    def tok_fp(path, *a, gguf_file=None, **k):
        return gpt2_tok if gguf_file is not None else real_tok_fp(path, *a, **k)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_fp)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tok_fp)
    return tiny, calls, tmp_path / "cache"


def test_conversion_is_reused_and_gives_the_same_model(fake_gguf):
    tiny, calls, cache = fake_gguf
    model, tok = models.load_model_and_tokenizer("smollm2-135m")
    assert calls["model"] == 1 and (cache / "smollm2-135m-instruct" / "config.json").exists()
    assert not hasattr(model.config, "quantization_config") or model.config.quantization_config is None
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, tiny(input_ids=ids).logits, atol=1e-5)
    models.load_model_and_tokenizer("SmolLM2")  # another alias, same cache: no second conversion
    assert calls["model"] == 1
    assert model.config._name_or_path == "smollm2-135m"  # EasyEdit and the stats paths see the alias


def test_interrupted_conversion_leaves_no_cache(fake_gguf, monkeypatch):
    _, calls, cache = fake_gguf

    def die(self, path, *a, **k):
        (open(os.path.join(path, "model.safetensors"), "wb")).write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.LlamaForCausalLM, "save_pretrained", die)
    with pytest.raises(KeyboardInterrupt):
        models.default_model_dir()
    assert not (cache / "smollm2-135m-instruct").exists()
    assert list(cache.iterdir()) == []  # the temporary folder went too
    monkeypatch.undo()


def test_full_disk_names_the_way_out(fake_gguf, monkeypatch):
    def full(self, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.LlamaForCausalLM, "save_pretrained", full)
    with pytest.raises(models.ModelLoadError, match="not enough disk space.*COACHHOOK_CACHE"):
        models.default_model_dir()
    assert not (fake_gguf[2] / "smollm2-135m-instruct").exists()


def test_incomplete_cache_says_delete_it(fake_gguf):
    target = fake_gguf[2] / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    with pytest.raises(models.ModelLoadError, match=r"incomplete \(no model.safetensors, tokenizer.json\).*rm -rf"):
        models.load_model_and_tokenizer("smollm2-135m")


def test_corrupt_cache_says_delete_it(fake_gguf):
    models.load_model_and_tokenizer("smollm2-135m")
    weights = fake_gguf[2] / "smollm2-135m-instruct" / "model.safetensors"
    weights.write_bytes(b"garbage")
    with pytest.raises(models.ModelLoadError, match="cannot be read.*rm -rf"):
        models.load_model_and_tokenizer("smollm2-135m")


def test_unknown_model_name(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelLoadError, match="unknown model 'no-such/model-xyz'.*smollm2-135m"):
        models.load_model_and_tokenizer("no-such/model-xyz")


def test_alias_resolves_through_easyedit_base_editor(fake_gguf, ee, gpt2_tok):
    """hparams `model_name: smollm2-135m` → EasyEdit's BaseEditor gets the cached checkpoint (PyPI EasyEdit
    alone only knows names containing 'gpt'/'llama'/'t5') and edits it with CoachHooK."""
    from coachhook_plugin import get_state
    from conftest import FACTS, tiny_hparams

    tiny, calls, _ = fake_gguf
    hp = tiny_hparams("llama", model_name="smollm2-135m", mom2_update_weight=1e-2)
    editor = ee.BaseEditor.from_hparams(hp)
    assert calls["model"] == 1 and editor.model_name == "smollm2-135m"
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(editor.model(input_ids=ids).logits, tiny(input_ids=ids).logits, atol=1e-5)
    editor.batch_edit(prompts=[f["prompt"] for f in FACTS[:2]], target_new=[f["target_new"] for f in FACTS[:2]],
                      subject=[f["subject"] for f in FACTS[:2]], keep_original_weight=False, verbose=False)
    assert get_state(editor.model).step == 1
