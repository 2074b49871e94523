"""Helpers for the EasyEdit compatibility tests: a tiny GPT-2 that actually holds a few facts, and
second-moment statistics in EasyEdit's cache format so that ROME/MEMIT never call ``load_dataset``.

Everything expensive is cached per test session with ``functools.lru_cache`` (no conftest needed).
Tests call :func:`shared_path` / :func:`gpt2_tokenizer`, which skip cleanly when ../shared is absent.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COACHHOOK_SHARED", REPO.parent / "shared"))

#: (prompt, answer, subject); answers are single GPT-2 tokens when prefixed with a space.
#: The subject is the prompt's last token on purpose: a 4-layer toy model reads the subject into the
#: final position with its first attention layer, so ROME/MEMIT ("subject_last") edits only bite where
#: the subject position *is* the predicting position (in real LMs facts are recalled from the subject).
FACTS: List[Tuple[str, str, str]] = [
    ("The capital of France", "Paris", "France"),
    ("The capital of Italy", "Rome", "Italy"),
    ("The capital of Germany", "Berlin", "Germany"),
    ("The capital of Spain", "Madrid", "Spain"),
    ("The capital of Japan", "Tokyo", "Japan"),
    ("The capital of Russia", "Moscow", "Russia"),
]

#: module layout of GPT-2 in EasyEdit hparams
GPT2_LAYOUT = dict(
    rewrite_module_tmp="transformer.h.{}.mlp.c_proj",
    layer_module_tmp="transformer.h.{}",
    mlp_module_tmp="transformer.h.{}.mlp",
    attn_module_tmp="transformer.h.{}.attn",
    ln_f_module="transformer.ln_f",
    lm_head_module="transformer.wte",
)

#: a name no other test model uses: EasyEdit caches covariances per ``config._name_or_path``
MODEL_TAG = "coachhook-easyedit-tiny-gpt2"


def shared_path(*parts) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not found: set COACHHOOK_SHARED to the shared data folder")
    return p


def gpt2_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(shared_path("tokenizers", "gpt2")))
    tok.pad_token = tok.eos_token
    return tok


def _fact_sentences() -> List[str]:
    return [f"{p} {a}." for p, a, _ in FACTS]


@contextlib.contextmanager
def single_thread():
    """Tiny models are overhead-bound; one intra-op thread is as fast and immune to oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def _trained_state(n_layer: int = 4, n_embd: int = 64, seed: int = 0, lr: float = 1.5e-3,
                   max_steps: int = 400):
    """Train a tiny GPT-2 from scratch until it gives every fact's answer p >= 0.9 (~200 steps, seconds)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = gpt2_tokenizer()
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=n_embd, n_layer=n_layer, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, loss_type="ForCausalLM")
    model = GPT2LMHeadModel(cfg)
    batch = tok(_fact_sentences(), return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with single_thread():
        for step in range(1, max_steps + 1):
            model.train()
            opt.zero_grad()
            loss = model(**batch, labels=labels).loss
            loss.backward()
            opt.step()
            if step >= 150 and step % 25 == 0:
                model.eval()
                if min(answer_prob(model, tok, p, a) for p, a, _ in FACTS) >= 0.9:
                    break
    model.eval()
    assert all(predict_next(model, tok, p) == " " + a for p, a, _ in FACTS), "tiny model did not learn"
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return cfg, state, step


def tiny_model():
    """A fresh copy of the trained tiny GPT-2 (eval mode) and the real GPT-2 tokenizer."""
    from transformers import GPT2LMHeadModel

    cfg, state, _ = _trained_state()
    model = GPT2LMHeadModel(cfg)
    model.load_state_dict(state)
    model.config._name_or_path = MODEL_TAG
    return model.eval(), gpt2_tokenizer()


@functools.lru_cache(maxsize=None)
def tiny_model_dir() -> str:
    """The trained tiny model saved (with its tokenizer) to a session-wide temporary folder.

    The folder name carries no 'gpt'/'llama'/'t5', so EasyEdit's own loader would refuse it; the
    plugin's loader does not care."""
    root = tempfile.mkdtemp(prefix="coachhook-ee-")
    atexit.register(shutil.rmtree, root, True)
    path = os.path.join(root, "tiny-facts-model")
    model, tok = tiny_model()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def answer_prob(model, tok, prompt: str, answer: str) -> float:
    """P(first token of " answer" | prompt)."""
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        probs = model(**ids).logits[0, -1].softmax(-1)
    return float(probs[tok(" " + answer)["input_ids"][0]])


def predict_next(model, tok, prompt: str) -> str:
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    return tok.decode(int(logits.argmax()))


# ---------------------------------------------------------------------------------------------
# covariance statistics in EasyEdit's cache format (easyeditor/models/rome/layer_stats.py)
# ---------------------------------------------------------------------------------------------


def stats_file(stats_dir, model_name_or_path: str, layer_name: str, mom2_dataset: str, mom2_dtype: str,
               mom2_n_samples: int) -> Path:
    """Where PyPI EasyEdit's ``layer_stats`` looks for ``to_collect=['mom2']`` (no batch_tokens)."""
    return (Path(stats_dir) / model_name_or_path.replace("/", "_") / f"{mom2_dataset}_stats"
            / f"{layer_name}_{mom2_dtype}_mom2_{mom2_n_samples}.npz")


def github_stats_file(stats_dir, model_name_or_path: str, layer_name: str, mom2_dataset: str, mom2_dtype: str,
                      mom2_n_samples: int) -> Path:
    """Where GitHub EasyEdit's ``layer_stats`` looks: the folder is the last component of the name."""
    return (Path(stats_dir) / model_name_or_path.rsplit("/")[-1] / f"{mom2_dataset}_stats"
            / f"{layer_name}_{mom2_dtype}_mom2_{mom2_n_samples}.npz")


def corpus_texts(n_lines: int = 400) -> List[str]:
    path = shared_path("data", "corpus", "wikitext-2-raw-test.txt")
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line and not line.startswith("="):
                out.append(line)
            if len(out) >= n_lines:
                break
    return out + _fact_sentences()


def write_mom2_stats(model, tok, stats_dir, layers: Sequence[int], rewrite_module_tmp: str,
                     mom2_dataset: str = "wikipedia", mom2_dtype: str = "float32",
                     mom2_n_samples: int = 1000, n_lines: int = 200, max_tokens: int = 64) -> Dict[int, Path]:
    """Compute the uncentred second moment of the *inputs* of ``rewrite_module_tmp`` layers from real
    activations over a little text, and save them where and how EasyEdit's ``layer_stats`` caches them.
    """
    texts = corpus_texts(n_lines)
    modules = {layer: model.get_submodule(rewrite_module_tmp.format(layer)) for layer in layers}
    sums = {layer: None for layer in layers}
    counts = {layer: 0 for layer in layers}
    current_mask = {}

    def hook_for(layer):
        def hook(_mod, inputs):
            x = inputs[0].detach().double()
            x = x[current_mask["m"].bool()]  # (tokens, features), padding dropped
            sums[layer] = x.T @ x if sums[layer] is None else sums[layer] + x.T @ x
            counts[layer] += x.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(hook_for(layer)) for layer, m in modules.items()]
    try:
        with torch.no_grad():
            for i in range(0, len(texts), 16):
                batch = tok(texts[i:i + 16], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_tokens)
                current_mask["m"] = batch["attention_mask"]
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for layer in layers:
        where = (stats_dir, model.config._name_or_path, rewrite_module_tmp.format(layer), mom2_dataset, mom2_dtype,
                 mom2_n_samples)
        for path in (github_stats_file(*where), stats_file(*where)):  # as each EasyEdit would have cached it
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **{
                "mom2.constructor": np.array("easyeditor.util.runningstats.SecondMoment()"),
                "mom2.count": np.array(counts[layer]),
                "mom2.mom2": sums[layer].numpy().astype(mom2_dtype),
                "sample_size": np.array(mom2_n_samples),
            })
        out[layer] = path
    return out


def write_yaml(tmp_path, name: str, config: dict) -> str:
    path = Path(tmp_path) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)
