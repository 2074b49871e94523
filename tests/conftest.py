"""Shared fixtures: tiny random GPT-2 / GPT-J / Llama models (built from configs, no downloads) and the
real GPT-2 tokenizer from ../shared (tests that need it skip cleanly when shared/ is absent)."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("COACHHOOK_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))

LAYOUTS = {
    "gpt2": dict(rewrite_module_tmp="transformer.h.{}.mlp.c_proj", layer_module_tmp="transformer.h.{}"),
    "gptj": dict(rewrite_module_tmp="transformer.h.{}.mlp.fc_out", layer_module_tmp="transformer.h.{}"),
    "llama": dict(rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}"),
}


def load_example(name: str):
    """examples/<name>.py as a module (the example scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def shared_path(*parts) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not found: set COACHHOOK_SHARED to the shared data folder")
    return p


@pytest.fixture(scope="session")
def gpt2_tok():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(shared_path("tokenizers", "gpt2")))
    tok.pad_token = tok.eos_token
    return tok


def build_tiny(arch: str, vocab_size: int = 50257, seed: int = 0, n_layer: int = 4, hidden: int = 64,
               init_range: float = 0.02):
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=hidden, n_layer=n_layer, n_head=4,
                         initializer_range=init_range)
        model = GPT2LMHeadModel(cfg)
    elif arch == "gptj":
        cfg = GPTJConfig(vocab_size=vocab_size, n_positions=128, n_embd=hidden, n_layer=n_layer, n_head=4,
                         rotary_dim=8, initializer_range=init_range)
        model = GPTJForCausalLM(cfg)
    elif arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=n_layer, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=128, initializer_range=init_range)
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model.config._name_or_path = f"tiny-{arch}"
    return model.eval()


def tiny_hparams(arch: str, **over):
    from coachhook_plugin import CoachHooKHyperParams

    base = dict(model_name=f"tiny-{arch}", layers=[1, 2], **LAYOUTS[arch], mom2_adjustment=False,
                mom2_update_weight=1.0, v_num_grad_steps=8, v_lr=0.5, context_templates=["{}", "Hello. {}"],
                device="cpu", batch_size=4)
    base.update(over)
    return CoachHooKHyperParams(**base)


@pytest.fixture(scope="session")
def ee():
    """PyPI easyeditor, imported through the plugin's guard (skips when it is not installed)."""
    from coachhook_plugin.easyedit import compat

    try:
        return compat.import_easyeditor()
    except ImportError as exc:
        pytest.skip(f"easyeditor not importable: {exc}")


@pytest.fixture(params=["gpt2", "gptj", "llama"])
def arch(request):
    return request.param


FACTS = [
    dict(prompt="The capital of Zorbia is", subject="Zorbia", target_new="Paris"),
    dict(prompt="Alice Moreau works as a", subject="Alice Moreau", target_new="pilot"),
    dict(prompt="The mother tongue of Kenji Tanabe is", subject="Kenji Tanabe", target_new="French"),
    dict(prompt="Mount Kelvar is located in", subject="Mount Kelvar", target_new="Peru"),
]


def same_state(a: dict, b: dict) -> bool:
    """Two CoachHooKState snapshots are equal: step, every state tensor bit for bit, α, key count, mode."""
    if a["step"] != b["step"] or a["layers"].keys() != b["layers"].keys():
        return False
    for l in a["layers"]:
        (ta, ea), (tb, eb) = a["layers"][l], b["layers"][l]
        if ea != eb or ta.keys() != tb.keys() or not all(torch.equal(ta[k], tb[k]) for k in ta):
            return False
    return True


# `coachhook edit` in a subprocess, through the console entry point. It needs no EasyEdit, so the subprocess blocks
# importing it (seconds) to start faster.
EDIT_LAUNCH = ("import sys; sys.modules['easyeditor'] = None; from coachhook_plugin.cli import main; "
               "sys.exit(main(sys.argv[1:]))")


def start_edit_killed_at_first_checkpoint(args, out_dir, cwd):
    """Start `coachhook edit ARGS` in a subprocess and SIGKILL it as soon as it reports checkpoint 1 (mid-way
    through batch 2). Returns (process, watcher thread, seen): `seen["progress"]` is progress.json as it was at
    the kill. The subprocess uses this process's thread count, so it computes bit for bit what an in-process run
    does."""
    import json
    import signal
    import subprocess
    import sys
    import threading

    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", EDIT_LAUNCH, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = {}

    def kill_after_first_checkpoint():
        for line in proc.stdout:
            if line.startswith("checkpoint 1/"):
                os.kill(proc.pid, signal.SIGKILL)
                seen["progress"] = json.loads((Path(out_dir) / "progress.json").read_text())
                break

    watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    watcher.start()
    return proc, watcher, seen
