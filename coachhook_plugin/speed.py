"""Edit time, side by side: one consecutive batch with CoachHooK (split by phase) and with EasyEdit's MEMIT.

Both run on the same model, requests, layers, statistics, value settings and context templates, in one
process, one after the other (CoachHooK's hooks are detached in between, so MEMIT edits the base model).
The split is taken by timing the functions `execute_coachhook` calls — values, keys, the solve, the gate's
calibration and the α pass — without touching the method's code.
"""
from __future__ import annotations

import contextlib
import time
from typing import Dict, List, Sequence

import torch

PHASES = {"values": ("compute_values", "compute_value"), "keys": ("compute_keys_and_hidden",),
          "solve": ("hook_update", "accumulated_keys_for"), "gate calibration": ("calibrate_gate",),
          "alpha pass": ("compute_alpha_candidates",)}


@contextlib.contextmanager
def phase_timer(module, phases: Dict[str, Sequence[str]] = PHASES):
    """Wrap the named functions of `module` so that the seconds spent in each phase add up in the yielded dict."""
    seconds = {p: 0.0 for p in phases}
    saved = {}

    def timed(fn, phase):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seconds[phase] += time.perf_counter() - t
        return wrapper

    for phase, names in phases.items():
        for name in names:
            if hasattr(module, name):
                saved[name] = getattr(module, name)
                setattr(module, name, timed(saved[name], phase))
    try:
        yield seconds
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def _batch_kwargs(records: Sequence[Dict]) -> Dict[str, List[str]]:
    return dict(prompts=[r["prompt"] for r in records], target_new=[r["target_new"] for r in records],
                ground_truth=[r["ground_truth"] for r in records], subject=[r["subject"] for r in records])


def edit_time(model, tok, hparams, memit_hparams, records: Sequence[Dict]) -> Dict[str, object]:
    """Seconds per edit for one batch of `records` with CoachHooK (and its split) and EasyEdit's MEMIT."""
    from . import method, remove_coachhook
    from .easyedit.edit_kwargs import consecutive_edit_kwargs
    from .easyedit.editor import make_editor
    from .easyedit.patches import editing_context, memit_context_templates

    n = len(records)
    editor = make_editor(hparams, model, tok)
    with editing_context(), phase_timer(method) as split:
        t = time.perf_counter()
        editor.batch_edit(**_batch_kwargs(records), verbose=False, **consecutive_edit_kwargs())
        coachhook_s = time.perf_counter() - t
    remove_coachhook(model)
    split["other"] = coachhook_s - sum(split.values())

    weights = {n_: p.detach().clone() for n_, p in model.named_parameters()
               if any(n_.startswith(memit_hparams.rewrite_module_tmp.format(l)) for l in memit_hparams.layers)}
    editor = make_editor(memit_hparams, model, tok)
    with editing_context(), memit_context_templates(hparams.context_templates or ["{}"]):
        t = time.perf_counter()
        editor.batch_edit(**_batch_kwargs(records), verbose=False, **consecutive_edit_kwargs())
        memit_s = time.perf_counter() - t
    with torch.no_grad():  # MEMIT wrote into the weights: put them back for whoever measures next
        params = dict(model.named_parameters())
        for name, w in weights.items():
            params[name].copy_(w)
    return {"edits": n, "coachhook_seconds_per_edit": coachhook_s / n, "memit_seconds_per_edit": memit_s / n,
            "ratio": coachhook_s / memit_s, "coachhook_split_seconds": split, "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- `coachhook bench-speed`
def run_bench_speed(model_name: str = "smollm2-135m", hparams: str = None, memit_hparams: str = None,
                    num_edits: int = 10, latency_edits: int = 1000, reps: int = 7, device: str = "auto",
                    out: str = "speed-results/speed.json") -> Dict[str, object]:
    """Edit time (one batch, CoachHooK vs EasyEdit MEMIT), then inference latency ratios after `latency_edits`
    edits and state bytes (`profiling.bench_speed`), all in one process on one model."""
    import json
    from pathlib import Path

    import coachhook_plugin  # noqa: F401  CoachHooK is registered with EasyEdit when easyeditor is imported
    from .demo import _ensure_statistics, _load_hparams, builtin_edits, default_hparams_path, DEFAULT_CORPUS
    from .models import load_model_and_tokenizer
    from .profiling import bench_speed

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    hp = _load_hparams(hparams or default_hparams_path("CoachHooK", model_name), model_name, device)
    mm = _load_hparams(memit_hparams or default_hparams_path("MEMIT", model_name), model_name, device)
    model, tok = load_model_and_tokenizer(model_name, device=device)
    hp.validate_for_model(model)
    _ensure_statistics(model, tok, [hp, mm], DEFAULT_CORPUS if DEFAULT_CORPUS.exists() else None, None)
    report: Dict[str, object] = {"model": model_name, "device": device, "threads": torch.get_num_threads()}
    report["edit_time"] = edit_time(model, tok, hp, mm, builtin_edits(num_edits))
    if latency_edits > 0:  # 0: edit time only
        report["inference"] = bench_speed(model, tok, hp, n_edits=latency_edits, batch_size=hp.batch_size, reps=reps)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1, default=str))
    return report


def format_speed_report(report: Dict[str, object], out: str) -> str:
    from .profiling import format_report

    e = report["edit_time"]
    split = ", ".join(f"{k} {v:.1f} s" for k, v in e["coachhook_split_seconds"].items())
    return "\n".join(
        [f"{report['model']} on {report['device']} ({report['threads']} threads)",
        f"edit time, one batch of {e['edits']}: CoachHooK {e['coachhook_seconds_per_edit']:.2f} s/edit, "
        f"EasyEdit MEMIT {e['memit_seconds_per_edit']:.2f} s/edit, ratio {e['ratio']:.2f} (goal ≤ 0.5)",
        f"CoachHooK split: {split}"]
        + ([f"inference after {report['inference']['n_edits']} edits (post/pre latency; goals 1.03 prompt, 1.05 "
            f"generate):", format_report(report["inference"])] if "inference" in report else [])
        + [f"written to {out}"])


def main(args) -> int:
    rep = run_bench_speed(model_name=args.model, hparams=args.hparams, memit_hparams=args.memit_hparams,
                          num_edits=args.num_edits, latency_edits=args.latency_edits, reps=args.reps,
                          device=args.device, out=args.out)
    print(format_speed_report(rep, args.out))
    return 0


def add_arguments(p) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--hparams", default=None, help="CoachHooK hparams (default hparams/CoachHooK/<model>.yaml)")
    p.add_argument("--memit-hparams", default=None, help="MEMIT hparams (default hparams/MEMIT/<model>.yaml)")
    p.add_argument("--num-edits", type=int, default=10, help="built-in edits for the edit-time batch")
    p.add_argument("--latency-edits", type=int, default=1000,
                   help="synthetic edits before measuring latency (0: measure the edit time only)")
    p.add_argument("--reps", type=int, default=7, help="interleaved repetitions per latency measurement")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", default="speed-results/speed.json")
