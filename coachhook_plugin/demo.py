"""`coachhook demo` (and `make demo`): CoachHooK end to end on the default model, offline, beside EasyEdit's MEMIT.

    coachhook demo                      # 30 built-in edits, SmolLM2-135M, CPU
    coachhook demo --num-edits 32 --device cuda --out my-demo

Steps: load the model (the default is converted from the bundled GGUF once and cached), compute or reuse the
covariance statistics, score the built-in edits on the unedited model, apply them in consecutive batches
through EasyEdit's `BaseEditor` with hparams/CoachHooK/<model>.yaml, score them, detach the hooks (the model
is the base model again, bit for bit), do the same with EasyEdit's MEMIT (hparams/MEMIT/<model>.yaml, same
layers, statistics and context templates), print a table and a few greedy generations, write JSON + PNG.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
EDITS_FILE = Path(__file__).resolve().parent / "data" / "demo_edits.json"
SHARED = Path(os.environ.get("COACHHOOK_SHARED", REPO.parent / "shared"))
DEFAULT_CORPUS = SHARED / "data" / "corpus" / "wikitext-2-raw-test.txt"
SHOWN_GENERATIONS = 3


class DemoError(RuntimeError):
    """Something the user can fix; the message says how."""


def builtin_edits(n: Optional[int] = None) -> List[Dict]:
    """The project's own counterfactual edits (subject, prompt, target, rephrase, unrelated locality prompt)."""
    edits = json.loads(EDITS_FILE.read_text(encoding="utf-8"))
    if n is not None:
        if not 1 <= n <= len(edits):
            raise DemoError(f"--num-edits must be between 1 and {len(edits)} (the built-in set has {len(edits)})")
        edits = edits[:n]
    return edits


def default_hparams_path(alg: str, model: str) -> Path:
    path = REPO / "hparams" / alg / f"{model}.yaml"
    if not path.exists():
        have = sorted(p.stem for p in (REPO / "hparams" / alg).glob("*.yaml"))
        raise DemoError(f"no {path.relative_to(REPO)}; pass --hparams/--memit-hparams for model {model!r} "
                        f"(shipped: {', '.join(have)})")
    return path


@torch.no_grad()
def greedy_generations(model, tok, prompts: Sequence[str], max_new_tokens: int = 8) -> List[str]:
    """Greedy continuations with the KV cache (as `generate` does), all prompts in one left-padded batch."""
    from .models import model_device

    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(list(prompts), return_tensors="pt", padding=True).to(model_device(model))
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    finally:
        tok.padding_side = side
    return [tok.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True) for o in out]


def score(model, tok, edits, loc_ref) -> Dict[str, float]:
    """EasyEdit's metrics (teacher-forced) plus generative reliability, on the model's state now."""
    from .evaluate import evaluate_records

    res = evaluate_records(model, tok, edits, loc_ref)
    gens = greedy_generations(model, tok, [e["prompt"] for e in edits])
    res["generative_reliability"] = sum(e["target_new"] in g for e, g in zip(edits, gens)) / len(edits)
    res["generations"] = gens[:SHOWN_GENERATIONS]
    return res


def _load_hparams(path, model_name, device):
    import yaml

    from .easyedit.imports import import_easyeditor
    from .hparams import CoachHooKHyperParams

    alg = yaml.safe_load(Path(path).read_text())["alg_name"]
    hp = CoachHooKHyperParams.from_hparams(path) if alg == "CoachHooK" else \
        getattr(import_easyeditor(), f"{alg}HyperParams").from_hparams(str(path))
    hp.model_name = model_name
    hp.device = 0 if device == "cuda" else "cpu"
    return hp


def _ensure_statistics(model, tok, hps, corpus: Optional[Path], n_samples: Optional[int]) -> str:
    """Statistics for the union of every method's layers, in the files all of them read (skipped if present)."""
    import copy

    from .stats import ensure_stats, statistics_texts

    base = copy.copy(hps[0])
    base.layers = sorted({l for hp in hps for l in hp.layers})
    if n_samples is not None:
        base.mom2_n_samples = n_samples
    if corpus is not None and Path(corpus).exists():
        texts = statistics_texts(model, tok, corpus, base.mom2_n_samples)
        source = f"{Path(corpus).name} ({base.mom2_n_samples} paragraphs)"
        base.mom2_dataset = Path(corpus).stem
    else:
        texts = statistics_texts(model, tok, None, base.mom2_n_samples, seed=0)
        source = f"text sampled from the model ({base.mom2_n_samples} samples, seed 0)"
        base.mom2_dataset = "self-sampled"
    for hp in hps:  # every method reads the same files
        hp.mom2_dataset, hp.mom2_n_samples, hp.stats_dir = base.mom2_dataset, base.mom2_n_samples, base.stats_dir
    ensure_stats(model, tok, base, texts)
    return source


def _quiet_console_logs() -> None:
    """EasyEdit logs every evaluation at INFO on the console; the demo keeps them in the log files only."""
    import logging

    for name in ("", "easyeditor", "easyeditor.editors.editor"):
        for h in logging.getLogger(name).handlers:
            if type(h) is logging.StreamHandler:  # not FileHandler (a subclass): the run.log keeps everything
                h.setLevel(logging.WARNING)


def _edit_consecutively(editor, edits, batch_size: int, label: str, log_path: Path) -> float:
    """Batches through EasyEdit's BaseEditor, never rolled back. EasyEdit prints every optimisation step to
    stdout: that goes to `log_path`, the progress bars (stderr) stay on screen."""
    import contextlib

    from tqdm.auto import tqdm

    from .easyedit.edit_kwargs import consecutive_edit_kwargs

    _quiet_console_logs()
    start = time.time()
    batches = [edits[s:s + batch_size] for s in range(0, len(edits), batch_size)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log, contextlib.redirect_stdout(log):
        for chunk in tqdm(batches, desc=f"{label}: consecutive batches of {batch_size}", file=sys.stderr):
            editor.batch_edit(prompts=[e["prompt"] for e in chunk], target_new=[e["target_new"] for e in chunk],
                              ground_truth=[e["ground_truth"] for e in chunk],
                              subject=[e["subject"] for e in chunk], verbose=False,
                              **consecutive_edit_kwargs())  # GitHub EasyEdit rolls back otherwise
    return time.time() - start


def run_demo(num_edits: int = 30, model: str = "smollm2-135m", device: str = "auto", batch_size: int = 10,
             out: str = "demo-results", hparams: Optional[str] = None, memit_hparams: Optional[str] = None,
             corpus: Optional[str] = None, n_samples: Optional[int] = None, memit: bool = True) -> Dict:
    t_start = time.time()
    timings: Dict[str, float] = {}
    import coachhook_plugin  # CoachHooK is registered with EasyEdit when easyeditor is imported
    from .easyedit.editor import make_editor
    from .easyedit.logs import set_log_dir
    from .easyedit.patches import editing_context, memit_context_templates
    from .easyedit.results import to_builtin
    from .evaluate import locality_reference
    from .models import load_model_and_tokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda, but torch sees no GPU; use --device cpu")
    edits = builtin_edits(num_edits)
    out_dir = Path(out)
    set_log_dir(out_dir)
    hp = _load_hparams(hparams or default_hparams_path("CoachHooK", model), model, device)
    memit_hp = _load_hparams(memit_hparams or default_hparams_path("MEMIT", model), model, device) if memit else None
    timings["start_up"] = time.time() - t_start

    t = time.time()
    net, tok = load_model_and_tokenizer(model, device=device)
    hp.validate_for_model(net)
    timings["load_model"] = time.time() - t
    t = time.time()
    corpus_path = Path(corpus) if corpus else (DEFAULT_CORPUS if DEFAULT_CORPUS.exists() else None)
    stats_source = _ensure_statistics(net, tok, [hp] + ([memit_hp] if memit else []), corpus_path, n_samples)
    timings["statistics"] = time.time() - t

    t = time.time()
    loc_ref = locality_reference(net, tok, edits)
    rows = {"pre-edit": score(net, tok, edits, loc_ref)}
    with torch.no_grad():
        probe = tok(edits[0]["prompt"], return_tensors="pt").to(net.device)
        base_logits = net(**probe).logits
    timings["evaluate_pre"] = time.time() - t

    _quiet_console_logs()
    editor = make_editor(hp, net, tok)
    with editing_context():
        secs = _edit_consecutively(editor, edits, batch_size, "CoachHooK", out_dir / "easyedit.log")
    rows["CoachHooK"] = score(net, tok, edits, loc_ref)
    rows["CoachHooK"]["seconds_per_edit"] = secs / len(edits)
    state = coachhook_plugin.get_state(net)
    alpha = {str(l): h.alpha for l, h in state.layers.items()}
    batches_written = state.step
    coachhook_plugin.remove_coachhook(net)
    with torch.no_grad():
        restored = torch.equal(net(**probe).logits, base_logits)
    timings["coachhook"] = secs

    if memit:
        templates = hp.context_templates or ["{}"]
        editor = make_editor(memit_hp, net, tok)
        with editing_context(), memit_context_templates(templates):
            secs = _edit_consecutively(editor, edits, batch_size, "EasyEdit MEMIT", out_dir / "easyedit.log")
        rows["MEMIT (EasyEdit)"] = score(net, tok, edits, loc_ref)
        rows["MEMIT (EasyEdit)"]["seconds_per_edit"] = secs / len(edits)
        timings["memit"] = secs
    timings["total"] = time.time() - t_start

    result = to_builtin({
        "model": model, "device": device, "num_edits": len(edits), "batch_size": batch_size,
        "hparams": {"CoachHooK": str(hparams or default_hparams_path("CoachHooK", model)),
                    **({"MEMIT": str(memit_hparams or default_hparams_path("MEMIT", model))} if memit else {})},
        "statistics": stats_source, "layers": list(hp.layers), "lambda": hp.mom2_update_weight,
        "alpha_after": alpha, "coachhook_batches": batches_written, "base_model_restored_bit_for_bit": restored,
        "prompts_shown": [e["prompt"] for e in edits[:SHOWN_GENERATIONS]],
        "targets_shown": [e["target_new"] for e in edits[:SHOWN_GENERATIONS]],
        "methods": rows, "timings_seconds": timings, "threads": torch.get_num_threads()})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    plot_results(result, out_dir / "results.png")
    return result


METRICS = ("reliability", "generality", "locality", "generative_reliability")


def format_report(result: Dict, out_dir: str) -> str:
    lines = [f"CoachHooK demo: {result['num_edits']} edits in consecutive batches of {result['batch_size']} on "
             f"{result['model']} ({result['device']}, {result['threads']} threads); statistics: {result['statistics']}",
             "", f"{'':18s}" + "".join(f"{m.replace('_', ' '):>24s}" for m in METRICS) + f"{'s / edit':>10s}"]
    for name, row in result["methods"].items():
        cells = "".join(f"{row.get(m, float('nan')):>24.2f}" for m in METRICS)
        spe = row.get("seconds_per_edit")
        lines.append(f"{name:18s}{cells}{(f'{spe:.1f}' if spe is not None else '—'):>10s}")
    lines += ["", "reliability / generality: EasyEdit's teacher-forced token accuracy on the edit / rephrased prompt;",
              "locality: agreement with the unedited model on unrelated prompts; generative reliability: greedy",
              "decoding with the KV cache contains the new target.", "", "Greedy generations (KV cache):"]
    for i, (prompt, target) in enumerate(zip(result["prompts_shown"], result["targets_shown"])):
        lines.append(f"  {prompt!r}  (new target: {target})")
        for name, row in result["methods"].items():
            lines.append(f"    {name:18s} → {row['generations'][i]!r}")
    t = result["timings_seconds"]
    lines += ["", "After detaching the hooks the model is the base model again, bit for bit: "
              f"{result['base_model_restored_bit_for_bit']}",
              "Time: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in t.items()),
              f"Results: {Path(out_dir) / 'results.json'} and {Path(out_dir) / 'results.png'} "
              f"(EasyEdit's own output: {Path(out_dir) / 'easyedit.log'})"]
    return "\n".join(lines)


def plot_results(result: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["methods"])
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [result["methods"][name].get(m, 0.0) for m in METRICS]
        ax.bar([j + i * width for j in range(len(METRICS))], vals, width, label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(METRICS))])
    ax.set_xticklabels([m.replace("_", " ") for m in METRICS])
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{result['num_edits']} consecutive edits on {result['model']}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args) -> int:
    from .models import ModelLoadError

    try:
        result = run_demo(num_edits=args.num_edits, model=args.model, device=args.device,
                          batch_size=args.batch_size, out=args.out, hparams=args.hparams,
                          memit_hparams=args.memit_hparams, corpus=args.corpus, n_samples=args.n_samples,
                          memit=not args.no_memit)
    except (DemoError, ModelLoadError) as exc:
        print(f"coachhook demo: {exc}", file=sys.stderr)
        return 2
    print(format_report(result, args.out))
    return 0


def add_arguments(p) -> None:
    p.add_argument("--num-edits", type=int, default=30, help="how many built-in edits (at most the set's size)")
    p.add_argument("--model", default="smollm2-135m", help="model alias, hub id or local path")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--out", default="demo-results", help="folder for results.json and results.png")
    p.add_argument("--hparams", default=None, help="CoachHooK hparams (default hparams/CoachHooK/<model>.yaml)")
    p.add_argument("--memit-hparams", default=None, help="MEMIT hparams (default hparams/MEMIT/<model>.yaml)")
    p.add_argument("--no-memit", action="store_true", help="skip the EasyEdit MEMIT comparison")
    p.add_argument("--corpus", default=None, help="text for the statistics (default: ../shared WikiText-2 if "
                                                  "present, else text sampled from the model)")
    p.add_argument("--n-samples", type=int, default=None, help="statistics budget (default: the hparams')")
