"""The EasyEdit compatibility layer, exercised through EasyEdit itself on CPU with a tiny trained GPT-2."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import easyedit_helpers as H  # noqa: E402

from coachhook_plugin.easyedit import compat  # noqa: E402

pytestmark = pytest.mark.easyedit  # also run against GitHub EasyEdit by `make test-github`


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with H.single_thread():
        yield


@pytest.fixture()
def in_tmp_cwd(tmp_path, monkeypatch):
    """Run in an empty cwd, to check that nothing (logs/run.log ...) is written there."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


# ---------------------------------------------------------------------------------------------
# import_easyeditor
# ---------------------------------------------------------------------------------------------


def test_import_easyeditor_stands_in_only_for_multimodal_code(ee):
    from easyeditor import BaseEditor  # noqa: F401  (text editing is importable)

    assert ee.BaseEditor is BaseEditor
    for name in compat.STOOD_IN:
        assert compat.is_multimodal_module(name), name
    # no third-party module is faked: what is not installed stays not importable
    for mod in compat.MULTIMODAL_ONLY_MODULES:
        m = sys.modules.get(mod)
        assert m is None or not hasattr(m, "__coachhook_stand_in__")
    import importlib.util

    if importlib.util.find_spec("timm") is None:
        assert "easyeditor.trainer.blip2_models.eva_vit" in compat.STOOD_IN
        from easyeditor.trainer.blip2_models import eva_vit

        with pytest.raises(ImportError, match="multimodal EasyEdit features need 'timm'.*coachhook-plugin stands in"):
            eva_vit.trunc_normal_(torch.zeros(2))
        with pytest.raises(compat.MissingMultimodalDependency):
            eva_vit.register_model.anything()
    if "easyeditor.dataset.processor.blip_processors" in compat.STOOD_IN:
        from easyeditor.dataset.processor import blip_processors

        with pytest.raises(ImportError, match="multimodal EasyEdit features need"):
            blip_processors.transforms.Normalize((0.5,), (0.5,))
    assert compat.import_easyeditor() is ee  # cached


def test_non_multimodal_failures_are_not_hidden():
    assert not compat.is_multimodal_module("easyeditor.models.rome.rome_main")
    assert not compat.is_multimodal_module("easyeditor.editors.editor")
    assert not compat.is_multimodal_module("timm.models")
    assert compat.is_multimodal_module("easyeditor.trainer.blip2_models.Qformer")
    assert compat.is_multimodal_module("easyeditor.dataset.processor.randaugment")


# ---------------------------------------------------------------------------------------------
# cpu_fallback
# ---------------------------------------------------------------------------------------------


def test_cpu_fallback_maps_cuda_to_cpu_and_restores(tmp_path):
    from transformers import BatchEncoding

    lin = torch.nn.Linear(2, 2)
    real_load = torch.load
    ckpt = tmp_path / "t.pt"
    torch.save({"w": torch.ones(2)}, ckpt)
    with compat.cpu_fallback(force=True) as active:
        assert active
        cpu = torch.device("cpu")
        assert torch.zeros(3, device="cuda:0").device == cpu
        assert torch.zeros(3, device=torch.device("cuda", 1)).device == cpu
        assert torch.tensor(-100, device="cuda:0").repeat(3).device == cpu
        t = torch.ones(2)
        assert t.to("cuda:0").device == cpu
        assert t.to(torch.device("cuda:0")).device == cpu
        assert t.to(device="cuda").device == cpu
        assert t.to(0).device == cpu
        assert t.to("cuda:0", torch.float64).dtype == torch.float64
        assert t.cuda().device == cpu and t.cuda(0).device == cpu
        assert t.new_zeros(2, device="cuda:3").device == cpu
        assert lin.to("cuda:0") is lin and lin.weight.device == cpu
        lin.to(torch.device("cuda:0"))
        lin.cuda()
        assert lin.weight.device == cpu
        assert BatchEncoding({"x": torch.ones(2)}).to("cuda:0")["x"].device == cpu
        assert torch.load(ckpt, map_location="cuda:0")["w"].device == cpu
        assert torch.load(ckpt, map_location=torch.device("cuda:0"))["w"].device == cpu
        torch.cuda.empty_cache()
        torch.cuda.synchronize()  # a no-op instead of "Torch not compiled with CUDA"
        with compat.cpu_fallback(force=True):  # nesting is fine
            assert torch.zeros(1, device="cuda").device == cpu
        assert torch.zeros(1, device="cuda").device == cpu
    assert torch.load is real_load
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(1, device="cuda:0")
        with compat.cpu_fallback() as active:  # automatic: on without a GPU
            assert active and torch.zeros(1, device="cuda:0").device.type == "cpu"
    else:  # pragma: no cover - GPU machines
        with compat.cpu_fallback() as active:
            assert not active


# ---------------------------------------------------------------------------------------------
# block outputs
# ---------------------------------------------------------------------------------------------


def test_cpu_fallback_accepts_cuda_cpu_device_strings(ee):
    """FT and LoRA build torch.device(f"cuda:{hparams.device}"): with `device: cpu` that is "cuda:cpu"."""
    import importlib

    ft_main = importlib.import_module("easyeditor.models.ft.ft_main")
    with pytest.raises(RuntimeError):
        ft_main.torch.device("cuda:cpu")
    with compat.cpu_fallback(force=True):
        assert ft_main.torch.device("cuda:cpu") == torch.device("cpu")
        assert ft_main.torch.device("cpu") == torch.device("cpu")
        assert ft_main.torch.zeros(1).device.type == "cpu"  # everything else is torch itself
    assert ft_main.torch is torch


def test_block_output_compat_gives_easyedit_tuple_view(ee):
    from easyeditor.util import nethook

    model, tok = H.tiny_model()
    ids = tok("The capital of France", return_tensors="pt")
    block = model.transformer.h[1]
    with torch.no_grad():
        ref = model(**ids).logits
        with nethook.Trace(model, "transformer.h.1") as tr:
            model(**ids)
    bare = tr.output
    assert isinstance(bare, torch.Tensor)  # transformers 5: the block output is a bare tensor

    seen = []

    def edit(cur_out, cur_layer):  # the way MEMIT's compute_z edits block outputs
        seen.append((type(cur_out), cur_layer))
        if cur_layer == "transformer.h.1":
            cur_out[0][0, -1, :] += torch.linspace(-3, 3, cur_out[0].shape[-1])
        return cur_out

    with compat.block_output_compat():
        with torch.no_grad(), nethook.TraceDict(model, ["transformer.h.1", "transformer.h.1.mlp"],
                                                edit_output=edit) as td:
            out = model(**ids).logits
        assert isinstance(td["transformer.h.1"].output, tuple)
        assert td["transformer.h.1"].output[0].shape == bare.shape
        assert isinstance(td["transformer.h.1.mlp"].output, torch.Tensor)  # non-blocks untouched
    assert (tuple, "transformer.h.1") in seen
    assert not torch.allclose(out, ref)  # the in-place edit reached the model
    # restored afterwards
    assert not getattr(nethook.Trace.__init__, "__coachhook_patch__", False)
    assert compat.is_decoder_block(model, block)
    with torch.no_grad(), nethook.Trace(model, "transformer.h.1") as tr:
        model(**ids)
    assert isinstance(tr.output, torch.Tensor)


# ---------------------------------------------------------------------------------------------
# to_builtin / restore_weights
# ---------------------------------------------------------------------------------------------


def test_to_builtin_makes_metrics_json_serialisable():
    metrics = [{"pre": {"rewrite_acc": [np.float64(0.5)], "locality": {"k_acc": np.array([1.0, 0.0])}},
                "post": {"rewrite_acc": [np.float32(1.0)], "n": np.int64(3), "flag": np.bool_(True)},
                "requested_rewrite": {"prompt": "p", "t": torch.tensor([1, 2]), "s": torch.tensor(2.5)},
                "time": 1.5, "tuple": (1, Path("/x")), 7: None, "dtype": torch.float32}]
    out = compat.to_builtin(metrics)
    text = json.dumps(out)
    back = json.loads(text)
    assert back[0]["post"]["rewrite_acc"] == [1.0]
    assert back[0]["post"]["n"] == 3 and back[0]["post"]["flag"] is True
    assert back[0]["pre"]["locality"]["k_acc"] == [1.0, 0.0]
    assert back[0]["requested_rewrite"]["t"] == [1, 2] and back[0]["requested_rewrite"]["s"] == 2.5
    assert back[0]["tuple"] == [1, "/x"] and back[0]["dtype"] == "torch.float32"
    assert type(out[0]["pre"]["rewrite_acc"][0]) is float


def test_is_batchable_knows_the_methods_that_read_one_request(ee):
    """ROME/KN read ``requests[0]`` only; PyPI's BatchEditor list lacks LoRA; the registry's methods answer."""
    from coachhook_plugin.bench.methods import register_bench_methods

    assert register_bench_methods()  # CoachHooK and the plugin's baselines

    assert not compat.is_batchable("ROME") and not compat.is_batchable("KN")
    for alg in ("MEMIT", "FT", "LoRA", "AlphaEdit", "CoachHooK", "CoachHooK-noHK"):
        assert compat.is_batchable(alg), alg


def test_context_templates_reach_memit_and_rome_and_are_put_back(ee):
    """The bench's shared templates go to both of EasyEdit's caches (MEMIT grouped, ROME flat), then back."""
    memit_main = compat.easyeditor_module("easyeditor.models.memit.memit_main")
    rome_main = compat.easyeditor_module("easyeditor.models.rome.rome_main")
    before = (memit_main.CONTEXT_TEMPLATES_CACHE, rome_main.CONTEXT_TEMPLATES_CACHE)
    with compat.memit_context_templates(["{}", "Hello. {}"]):
        assert memit_main.CONTEXT_TEMPLATES_CACHE == [["{}"], ["Hello. {}"]]
        assert rome_main.CONTEXT_TEMPLATES_CACHE == ["{}", "Hello. {}"]
    assert (memit_main.CONTEXT_TEMPLATES_CACHE, rome_main.CONTEXT_TEMPLATES_CACHE) == before
    with pytest.raises(ValueError, match="raw prompt"):
        with compat.memit_context_templates(["Hello. {}"]):
            pass


def test_restore_weights_dict_and_callable():
    lin = torch.nn.Linear(2, 2)
    orig = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight += 1
    compat.restore_weights(lin, {"weight": orig})
    assert torch.equal(lin.weight, orig)
    called = []
    compat.restore_weights(lin, lambda: called.append(1))
    compat.restore_weights(lin, None)
    compat.restore_weights(lin, {})
    assert called == [1]


# ---------------------------------------------------------------------------------------------
# EasyEdit's own methods through BaseEditor.from_hparams(...).edit(...) on CPU
# ---------------------------------------------------------------------------------------------

EDIT = dict(prompts=["The capital of France"], target_new=["Rome"], subject=["France"],
            ground_truth=["Paris"])


def _edit_and_check(ee, hparams, expect_changed=True):
    from easyeditor import BaseEditor

    assert compat.install()
    editor = BaseEditor.from_hparams(hparams)
    assert isinstance(editor.model_name, str) and editor.model.device.type in ("cpu", "cuda")
    metrics, edited, _ = editor.edit(**EDIT, verbose=False, **compat.consecutive_edit_kwargs("edit"))
    m = compat.to_builtin(metrics)[0]
    json.dumps(m)
    pre, post = m["pre"]["rewrite_acc"], m["post"]["rewrite_acc"]
    assert np.mean(post) > np.mean(pre), (pre, post)
    assert H.predict_next(edited, editor.tok, EDIT["prompts"][0]) == " Rome"
    return editor, edited, m


def test_easyedit_ft_edits_on_cpu(ee, tmp_path, in_tmp_cwd):
    from easyeditor import FTHyperParams

    cfg = dict(alg_name="FT", model_name=H.tiny_model_dir(), device=0, layers=[2], num_steps=25, batch_size=1,
               max_length=40, lr=5e-3, weight_decay=0.0, kl_factor=0.0, norm_constraint=5e-2,
               **H.GPT2_LAYOUT)
    hparams = compat.load_easyedit_hparams(H.write_yaml(tmp_path, "ft", cfg))  # GitHub's class needs more fields
    assert isinstance(hparams, FTHyperParams)
    _edit_and_check(ee, hparams)
    assert not (in_tmp_cwd / "logs").exists()  # no ./logs/run.log


def _stats_for(tmp_path, layers, mom2_n_samples=1000):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = H.tiny_model_dir()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.eos_token
    stats_dir = tmp_path / "stats"
    H.write_mom2_stats(model, tok, stats_dir, layers, H.GPT2_LAYOUT["rewrite_module_tmp"],
                       mom2_n_samples=mom2_n_samples)
    return str(stats_dir)


def _no_dataset_download(monkeypatch):
    from easyeditor.models.rome import layer_stats

    def refuse(*a, **k):
        raise AssertionError("EasyEdit tried to load a dataset: the statistics cache was not found")

    monkeypatch.setattr(layer_stats, "load_dataset", refuse)


def test_easyedit_rome_edits_on_cpu(ee, tmp_path, in_tmp_cwd, monkeypatch):
    from easyeditor import ROMEHyperParams

    _no_dataset_download(monkeypatch)
    cfg = dict(alg_name="ROME", model_name=H.tiny_model_dir(), device=0, layers=[1], fact_token="subject_last",
               v_num_grad_steps=25, v_lr=0.5, v_loss_layer=3, v_weight_decay=0.001, clamp_norm_factor=50,
               kl_factor=0.0625, mom2_adjustment=True, context_template_length_params=[[5, 5]],
               mom2_dataset="wikipedia", mom2_n_samples=1000, mom2_dtype="float32",
               stats_dir=_stats_for(tmp_path, [1]), **H.GPT2_LAYOUT)
    hparams = ROMEHyperParams.from_hparams(H.write_yaml(tmp_path, "rome", cfg))
    _edit_and_check(ee, hparams)


def test_easyedit_memit_edits_on_cpu(ee, tmp_path, in_tmp_cwd, monkeypatch):
    from easyeditor import MEMITHyperParams

    _no_dataset_download(monkeypatch)
    cfg = dict(alg_name="MEMIT", model_name=H.tiny_model_dir(), device=0, layers=[0, 1],
               layer_selection="all", fact_token="subject_last", v_num_grad_steps=25, v_lr=0.5, v_loss_layer=3,
               v_weight_decay=0.001, clamp_norm_factor=50, kl_factor=0.0625, mom2_adjustment=True,
               mom2_update_weight=1000, mom2_dataset="wikipedia", mom2_n_samples=1000, mom2_dtype="float32",
               stats_dir=_stats_for(tmp_path, [0, 1]), batch_size=1, **H.GPT2_LAYOUT)
    hparams = MEMITHyperParams.from_hparams(H.write_yaml(tmp_path, "memit", cfg))
    _edit_and_check(ee, hparams)


def test_easyedit_lora_edits_on_cpu(ee, tmp_path, in_tmp_cwd):
    from easyeditor import LoRAHyperParams

    cfg = dict(alg_name="LoRA", model_name=H.tiny_model_dir(), device=0, layers=[], num_steps=30, lr=5e-3,
               weight_decay=0.0, kl_factor=0.0, norm_constraint=5e-2, target_modules=["c_attn", "c_proj"],
               rank=8, lora_alpha=32, lora_dropout=0.1, batch_size=1, max_length=40)
    hparams = compat.load_easyedit_hparams(H.write_yaml(tmp_path, "lora", cfg))  # GitHub's class needs lora_type
    assert isinstance(hparams, LoRAHyperParams)
    # PyPI's LoRAHyperParams lacks model_parallel, which BaseEditor reads: the plugin papers over it
    assert getattr(hparams, "model_parallel", False) is False
    editor, edited, _ = _edit_and_check(ee, hparams)
    assert not edited.training  # peft left it in train mode (dropout during evaluation)
    assert editor.tok.pad_token_id == editor.tok.eos_token_id  # the temporary pad swap was undone
