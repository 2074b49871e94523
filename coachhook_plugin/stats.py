"""Covariance statistics E[kkᵀ] of down-projection inputs, in EasyEdit's file format and path scheme.

EasyEdit (`rome/layer_stats.py`) caches the uncentered second moment at
    {stats_dir}/{model_name}/{dataset}_stats/{layer_name}_{dtype}_mom2_{n_samples}.npz
with npz keys `mom2.mom2` (Σkkᵀ), `mom2.count`, `mom2.constructor`, `sample_size`; E[kkᵀ] = mom2 / count.
Writing exactly that lets EasyEdit's MEMIT/ROME and CoachHooK share one file.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Sequence

import numpy as np
import torch

from .edit_requests import pad_id_of, pad_right
from .files import atomic_write
from .models import get_module, model_device, model_names_for_stats


class StatsError(FileNotFoundError):
    pass


def second_moment_path(stats_dir, model_name: str, dataset: str, layer_name: str, dtype: str,
                       n_samples) -> Path:
    suffix = "" if n_samples is None else f"_{n_samples}"
    return Path(stats_dir) / model_name / f"{dataset}_stats" / f"{layer_name}_{dtype}_mom2{suffix}.npz"


def paths_for(model, hparams, layer_name: str) -> List[Path]:
    """The file for this layer under every model folder name an EasyEdit reads (PyPI and GitHub EasyEdit
    name the folder differently for hub ids and local paths); the first is where new files are written."""
    return [second_moment_path(hparams.stats_dir, name, hparams.mom2_dataset, layer_name, hparams.mom2_dtype,
                               hparams.mom2_n_samples) for name in model_names_for_stats(model)]


def path_for(model, hparams, layer_name: str) -> Path:
    """This layer's statistics file: the first that exists among `paths_for` (so files written by either
    EasyEdit are found), else the one new files are written to."""
    paths = paths_for(model, hparams, layer_name)
    return next((p for p in paths if p.exists()), paths[0])


def share_with_every_easyedit(model, hparams, layer_name: str) -> List[Path]:
    """Make an existing statistics file visible under every folder name an EasyEdit reads (a hard link, or a
    copy where links are impossible); existing files are left alone. Returns the paths that exist now."""
    paths = paths_for(model, hparams, layer_name)
    source = next((p for p in paths if p.exists()), None)
    if source is None:
        return []
    for p in paths:
        if p.exists():
            continue

        def link_or_copy(tmp):  # a reader never sees a partial file
            os.remove(tmp)
            try:
                os.link(source, tmp)
            except OSError:
                shutil.copyfile(source, tmp)

        atomic_write(p, link_or_copy)
    return [p for p in paths if p.exists()]


def save_second_moment(path: Path, mom2_sum: torch.Tensor, count: int, n_samples) -> None:
    """Write atomically: an interrupted run never leaves a truncated file."""
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a temporary name
            np.savez(f, **{"mom2.constructor": np.array("easyeditor.util.runningstats.SecondMoment()"),
                           "mom2.count": np.array(int(count)),
                           "mom2.mom2": mom2_sum.cpu().numpy(),
                           "sample_size": np.array(n_samples if n_samples is not None else -1)})

    atomic_write(path, write)


def load_second_moment(path: Path, d_in: int) -> torch.Tensor:
    """E[kkᵀ] as float64 (d_in × d_in); clear errors for a missing or wrong-shaped file."""
    path = Path(path)
    if not path.exists():
        raise StatsError(
            f"covariance statistics not found at {path}. Compute them (`coachhook stats --hparams <yaml> "
            f"--corpus <text file>` or coachhook_plugin.stats.compute_second_moments), point stats_dir / "
            f"mom2_dataset / mom2_n_samples at an existing EasyEdit stats file, or set mom2_adjustment: false")
    with np.load(path) as data:
        if "mom2.mom2" not in data or "mom2.count" not in data:
            raise StatsError(f"{path} is not an EasyEdit second-moment file (needs keys mom2.mom2, mom2.count)")
        mom2 = torch.from_numpy(np.asarray(data["mom2.mom2"], dtype=np.float64))
        count = int(data["mom2.count"])
    if mom2.shape != (d_in, d_in):
        raise StatsError(f"{path} holds a {tuple(mom2.shape)} matrix, but the down-projection takes {d_in} "
                         f"inputs; the file belongs to another model or layer: delete it or fix stats_dir")
    if count <= 0:
        raise StatsError(f"{path} has count {count}; recompute it")
    return mom2 / count


@torch.no_grad()
def compute_second_moments(model, tok, texts: Iterable[str], layer_names: Sequence[str], max_length: int = 256,
                           batch_size: int = 8, progress: bool = True) -> Dict[str, tuple]:
    """Σkkᵀ and token count of the inputs of each named module over texts (pad tokens excluded)."""
    from tqdm.auto import tqdm

    device = model_device(model)
    sums: Dict[str, torch.Tensor] = {}
    counts = {n: 0 for n in layer_names}
    current = {}

    class _Enough(Exception):
        """Raised once every wanted input is seen: the layers above them need not run."""

    def make_hook(name):
        def pre(mod, args):
            current[name] = args[0]
            if len(current) == len(layer_names):
                raise _Enough
        return pre

    handles = [get_module(model, n).register_forward_pre_hook(make_hook(n)) for n in layer_names]
    texts = [t for t in texts if t.strip()]
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc="covariance statistics", disable=not progress):
            chunk = texts[start:start + batch_size]
            seqs = [list(tok(t, truncation=True, max_length=max_length)["input_ids"]) for t in chunk]
            ids, mask = pad_right(seqs, pad_id_of(tok), device)
            current.clear()
            try:
                model(input_ids=ids, attention_mask=mask)
            except _Enough:
                pass
            keep = mask.bool().reshape(-1)
            for n in layer_names:
                # the product in float32 (EasyEdit's mom2_dtype; ~5× faster than float64 on CPU), the
                # running sum in float64 so that many batches do not lose precision
                feats = current[n].reshape(-1, current[n].shape[-1])[keep].float()
                sums[n] = sums.get(n, 0) + (feats.t() @ feats).double()
                counts[n] += int(keep.sum())
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n], counts[n]) for n in layer_names}


def read_corpus(path, max_texts: int = None) -> List[str]:
    """Paragraphs of a text file, or of every .txt file under a folder."""
    path = Path(path)
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    texts: List[str] = []
    for f in files:
        for para in f.read_text(encoding="utf-8", errors="replace").split("\n"):
            para = para.strip()
            if len(para) > 40 and not para.startswith("="):
                texts.append(para)
                if max_texts and len(texts) >= max_texts:
                    return texts
    return texts


@torch.no_grad()
def sample_texts(model, tok, n: int, max_new_tokens: int = 128, seed: int = 0, batch_size: int = 32,
                 progress: bool = True) -> List[str]:
    """Text sampled from the model itself (the offline default when no corpus is given), seeded.

    Generation starts from the tokenizer's BOS (or EOS) token and samples with temperature 1 and top-k 50;
    the statistics then describe the keys the model produces on its own distribution of text. Batches of 32:
    one cached decoding step costs nearly the same for 8 or 32 sequences on a CPU, so wider is faster."""
    from tqdm.auto import tqdm

    device = model_device(model)
    start_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if start_id is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start sampling from; give a corpus")
    texts: List[str] = []
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        for start in tqdm(range(0, n, batch_size), desc="sampling text for statistics", disable=not progress):
            b = min(batch_size, n - start)
            ids = torch.full((b, 1), start_id, dtype=torch.long, device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=50,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id_of(tok))
            texts.extend(t for t in tok.batch_decode(out[:, 1:], skip_special_tokens=True))
    return [t for t in texts if t.strip()]


def statistics_texts(model, tok, corpus, n_samples: int, seed: int = 0) -> Callable[[], List[str]]:
    """Where λ·E[kkᵀ] comes from, produced only when called: the first `n_samples` paragraphs of `corpus` (a
    text file or a folder of .txt files), or, when `corpus` is None, `n_samples` texts sampled from the model
    itself (seeded): statistics never need a download."""
    if corpus is None:
        return lambda: sample_texts(model, tok, n_samples, seed=seed)
    return lambda: read_corpus(corpus, max_texts=n_samples)


def ensure_stats(model, tok, hparams, texts, layer_names: Sequence[str] = None, **kw) -> List[Path]:
    """Compute and write the statistics files hparams point at, skipping those that exist, and make each
    visible under every model folder name an EasyEdit reads (`share_with_every_easyedit`).

    `texts`: a sequence of strings, or a callable returning one (called only if a file is missing)."""
    layer_names = layer_names or [hparams.rewrite_module_tmp.format(l) for l in hparams.layers]
    todo = [n for n in layer_names if not path_for(model, hparams, n).exists()]
    if todo:
        if callable(texts):  # produced only when needed (sampling text from the model is not free)
            texts = texts()
        for n, (s, c) in compute_second_moments(model, tok, texts, todo, **kw).items():
            save_second_moment(path_for(model, hparams, n), s, c, hparams.mom2_n_samples)
    for n in layer_names:  # PyPI and GitHub EasyEdit's MEMIT/ROME look under different folder names
        share_with_every_easyedit(model, hparams, n)
    return [path_for(model, hparams, n) for n in layer_names]
