"""results.json, results.md (a table like the paper's Table 2) and PNG plots (Fig. 4-style curves, time per edit)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

from ..files import atomic_write

TABLE_METRICS = (("reliability", "Reliability"), ("generality", "Generality"), ("locality", "Locality"),
                 ("average", "Average"), ("generative_reliability", "Gen. reliability"))
CURVE_METRICS = ("reliability", "generality", "locality", "generative_reliability")


def plain(obj):
    """JSON with plain Python numbers only (no numpy / tensors; NaN and inf become null)."""
    from ..easyedit.results import to_builtin

    obj = to_builtin(obj)

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return clean(obj)


def write_json(path: Path, results: Dict) -> None:
    text = json.dumps(plain(results), indent=2)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


REFERENCE_ALG = "Unedited"  # the bench's no-op method (baselines/unedited.py)


def _ranks(values: Dict[str, Optional[float]]) -> Dict[str, int]:
    """1 for the best, 2 for the second best (ties share a rank), else 0."""
    distinct = sorted({round(v, 6) for v in values.values() if v is not None}, reverse=True)
    top = distinct[:2]
    return {k: (top.index(round(v, 6)) + 1 if v is not None and round(v, 6) in top else 0)
            for k, v in values.items()}


def markdown_table(results: Dict) -> str:
    cfg, methods = results["config"], results["methods"]
    ok = {k: m for k, m in methods.items() if m.get("final")}
    cols = [(key, title) for key, title in TABLE_METRICS if any(key in m["final"] for m in ok.values())]
    lines = [f"# {cfg.get('protocol')} · {cfg.get('model')} · {cfg.get('data_format')} · "
             f"{cfg.get('num_edits')} edits · batch {cfg.get('batch_size')}", "",
             "| Method | " + " | ".join(t for _, t in cols) + " | s / edit | failed edits |",
             "|---|" + "---|" * (len(cols) + 2)]
    # the Unedited row is the reference (locality 100 % by definition), not a contender for best / second
    ranked = {k: m for k, m in ok.items() if m.get("alg_name") != REFERENCE_ALG}
    ranks = {key: _ranks({k: m["final"].get(key) for k, m in ranked.items()}) for key, _ in cols}
    for key, m in methods.items():
        label = m.get("label", key)
        if not m.get("final"):
            lines.append(f"| {label} | " + " | ".join("—" for _ in cols) + f" | — | failed: {m.get('error', '?')} |")
            continue
        cells = []
        for metric, _ in cols:
            v = m["final"].get(metric)
            text = "—" if v is None else f"{100 * v:.2f}"
            r = ranks[metric].get(key, 0)
            cells.append(f"**{text}**" if r == 1 else (f"<u>{text}</u>" if r == 2 else text))
        spe = m.get("seconds_per_edit")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {spe:.2f} | {len(m.get('failed_edits', []))} |")
    lines += ["", "Scores in %, EasyEdit's definitions (teacher-forced token accuracy; locality = agreement "
                  "with the pre-edit model); Average = mean of reliability, generality and locality; "
                  "**best**, <u>second best</u> per column. Generative reliability: greedy decoding with "
                  "the KV cache contains the target."]
    if len(ranked) < len(ok):
        lines.append("The unedited base model is a reference row, left out of the best / second marks.")
    if cfg.get("protocol") == "consecutive":
        lines.append("Consecutive: all edits scored after the last batch (curve: at each checkpoint, on the "
                     "state at that checkpoint).")
    skipped = cfg.get("skipped_records")
    if skipped:
        lines.append(f"{skipped} ill-formed record(s) left out of the data before any method ran (results.json).")
    return "\n".join(lines) + "\n"


def plot(results: Dict, out_dir: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = {k: m for k, m in results["methods"].items() if m.get("curve")}
    paths = []
    metrics = [m for m in CURVE_METRICS if any(m in pt for v in methods.values() for pt in v["curve"])]
    # the legend goes under the plots, two labels a row: long row labels would cover the curves
    legend_rows = -(-len(methods) // 2)
    height = 3.6 + 0.22 * legend_rows
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(4.2 * max(1, len(metrics)), height), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for key, m in methods.items():
            pts = [(p["edits"], p[metric]) for p in m["curve"] if p.get(metric) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m.get("label", key))
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("number of edits")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"{results['config'].get('protocol')} editing, {results['config'].get('model')}")
    fig.tight_layout(rect=(0, 0.22 * legend_rows / height + 0.01, 1, 1))
    paths.append(out_dir / "metrics_vs_edits.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    timed = {k: m for k, m in results["methods"].items() if m.get("seconds_per_edit") is not None}
    # horizontal bars: the row labels read in full, however long
    fig, ax = plt.subplots(figsize=(10.0, 1.2 + 0.4 * max(1, len(timed))))
    ax.barh([m.get("label", k) for k, m in timed.items()], [m["seconds_per_edit"] for m in timed.values()])
    ax.invert_yaxis()  # the table's order, top to bottom
    ax.set_xlabel("seconds per edit")
    ax.set_title("editing time per edit")
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    paths.append(out_dir / "time_per_edit.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
