"""Inference overhead and editor-state memory of CoachHooK (issue 6), measured rather than estimated.

* `latency_ratios(model, ...)`: post-/pre-edit latency for prompt processing (batch × tokens, one forward)
  and greedy generation (new tokens with the KV cache), measured side by side in one run: repetitions
  interleaved (pre, post, post, pre, …: drift cancels), medians compared. "pre" is the same model with the
  hooks detached (bit-identical to the base model), "post" with them attached.
* `synthesize_edits(model, hparams, n_edits, ...)`: puts n edits' worth of hook state on a model without the
  minutes-per-batch value optimisation, through the real update path (`HookLayer.add_delta` / `add_keys`,
  so the representation — low rank or dense, keys or Gram — is the one n real edits give), then calibrates
  the gate on the real calibration prompts. Latency depends on shapes, rank and how many tokens the gate
  swaps, not on what the edits say; use a really edited model where the swap rate matters.
* `state_bytes_table(...)`: state bytes per number of edits for GPT2-XL, GPT-J and Llama-3-8B shapes, by
  running the same `add_delta` / `add_keys` code on meta-device tensors (no memory, no compute): the bytes are
  those the real code allocates, not a separate formula.
* `bench_speed(model, tok, hparams, ...)`: all of the above in one dict (what `coachhook bench-speed` prints).
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from .hook import HookLayer

# (layers edited, d_in of the down-projection, d_out) as in hparams/CoachHooK/*.yaml
MODEL_SHAPES = {
    "gpt2-xl": dict(n_layers=5, d_in=6400, d_out=1600),
    "gpt-j-6b": dict(n_layers=6, d_in=16384, d_out=4096),
    "llama-3-8b": dict(n_layers=5, d_in=14336, d_out=4096),
}
DEFAULT_EDIT_COUNTS = (0, 100, 1000, 10000)


# --------------------------------------------------------------------------- memory
def _meta_layer(d_in: int, d_out: int) -> HookLayer:
    return HookLayer("meta", torch.nn.Linear(d_in, d_out, bias=False, device="meta"), alpha_z=2.2)


def simulate_layer_bytes(d_in: int, d_out: int, edit_counts: Iterable[int] = DEFAULT_EDIT_COUNTS,
                         batch_size: int = 10) -> Dict[int, Dict[str, object]]:
    """State bytes of one hook layer after n edits in batches of `batch_size` (every batch adds full rank, the
    worst case), from HookLayer's own update code run on meta tensors."""
    counts = sorted(set(int(n) for n in edit_counts))
    layer = _meta_layer(d_in, d_out)
    out, done = {}, 0
    for n in counts:
        while done < n:
            b = min(batch_size, n - done)
            layer.add_delta(torch.empty(d_out, d_in, dtype=torch.float64, device="meta"),
                            torch.empty(d_out, b, dtype=torch.float64, device="meta"))
            layer.add_keys(torch.empty(d_in, b, dtype=torch.float32, device="meta"))
            done += b
        tensors = layer.state_tensors()
        out[n] = {"bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                  "tensors": {k: list(t.shape) for k, t in tensors.items()}}
    return out


def dense_bound_bytes(d_in: int, d_out: int) -> int:
    """The reference implementation's per-layer state: a float32 d_in × d_in C_accu and a float32 W_h copy."""
    return 4 * d_in * d_in + 4 * d_out * d_in


def state_bytes_table(shapes: Optional[Dict[str, dict]] = None, edit_counts: Sequence[int] = DEFAULT_EDIT_COUNTS,
                      batch_size: int = 10) -> Dict[str, dict]:
    """{model: {"per_edits": {n: bytes of the whole editor state}, "dense_bound": bytes, "layout": {n: tensors
    of one layer}, "shared_prior_bytes": λ·E[kkᵀ] read once and shared (float64), not part of the state}}."""
    shapes = MODEL_SHAPES if shapes is None else shapes
    table = {}
    for name, s in shapes.items():
        per = simulate_layer_bytes(s["d_in"], s["d_out"], edit_counts, batch_size)
        table[name] = {
            "n_layers": s["n_layers"], "d_in": s["d_in"], "d_out": s["d_out"],
            "per_edits": {n: s["n_layers"] * v["bytes"] for n, v in per.items()},
            "layout": {n: v["tensors"] for n, v in per.items()},
            "dense_bound": s["n_layers"] * dense_bound_bytes(s["d_in"], s["d_out"]),
            "shared_prior_bytes": s["n_layers"] * 8 * s["d_in"] ** 2,
        }
    return table


def format_state_table(table: Dict[str, dict]) -> str:
    counts = sorted({n for v in table.values() for n in v["per_edits"]})
    head = "| model (layers, d_in → d_out) | " + " | ".join(f"{n:,} edits" for n in counts) + " | dense bound |"
    lines = [head, "|" + "---|" * (len(counts) + 2)]
    for name, v in table.items():
        cells = [f"{v['per_edits'][n] / 1e6:,.1f} MB" for n in counts]
        lines.append(f"| {name} ({v['n_layers']}, {v['d_in']} → {v['d_out']}) | " + " | ".join(cells)
                     + f" | {v['dense_bound'] / 1e6:,.1f} MB |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- synthetic state
@torch.no_grad()
def synthesize_edits(model, hparams, n_edits: int, batch_size: int = 10, tok=None, seed: int = 0,
                     scale: float = 1e-3):
    """Attach CoachHooK to `model` (if needed) and add `n_edits` random edits per layer through the real update
    path; then calibrate the gate (needs `tok`) and set α = α_z. Returns the CoachHooKState."""
    from .method import ensure_state
    from .scope import calibrate_gate

    state = ensure_state(model, hparams)
    g = torch.Generator().manual_seed(seed)
    done = 0
    while done < n_edits:
        b = min(batch_size, n_edits - done)
        for h in state.layers.values():
            keys = torch.randn(h.d_in, b, generator=g, dtype=torch.float64)
            resid = scale * torch.randn(h.d_out, b, generator=g, dtype=torch.float64)
            p = torch.randn(h.d_in, b, generator=g, dtype=torch.float64) / h.d_in ** 0.5
            h.add_delta(resid @ p.t(), resid)
            h.add_keys(keys.float())
        done += b
    state.step += -(-n_edits // batch_size)
    if tok is not None:
        calibrate_gate(model, tok, state)
    return state


# --------------------------------------------------------------------------- latency
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


@torch.no_grad()
def latency_ratios(model, *, batch: int = 8, seq_len: int = 128, gen_prompt_len: int = 16, new_tokens: int = 64,
                   reps: int = 7, warmup: int = 1, seed: int = 0, pad_token_id: Optional[int] = None,
                   modes: Sequence[str] = ("prompt", "generate")) -> Dict[str, dict]:
    """Post-/pre-edit latency ratios of a model carrying CoachHooK hooks (see module doc). Inputs are random
    token ids (seeded). Returns {"prompt": {...}, "generate": {...}} with median seconds, ratio, all times."""
    from .method import get_state

    state = get_state(model)
    if state is None:
        raise ValueError("the model carries no CoachHooK state: edit it (or synthesize_edits) first")
    device = next(model.parameters()).device
    vocab = int(model.get_input_embeddings().weight.shape[0])
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(0, vocab, (batch, seq_len), generator=g).to(device)
    prompt_mask = torch.ones_like(prompt_ids)
    gen_ids = torch.randint(0, vocab, (1, gen_prompt_len), generator=g).to(device)
    if pad_token_id is None:
        pad_token_id = getattr(model.config, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(model.config, "eos_token_id", None) or 0
        if isinstance(pad_token_id, (list, tuple)):
            pad_token_id = pad_token_id[0]

    def prompt():
        model(input_ids=prompt_ids, attention_mask=prompt_mask)

    def generate():
        out = model.generate(input_ids=gen_ids, attention_mask=torch.ones_like(gen_ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_token_id)
        assert out.shape[1] == gen_prompt_len + new_tokens

    fns = {"prompt": prompt, "generate": generate}
    results = {}
    attached = bool(state.layers) and next(iter(state.layers.values())).handle is not None

    def set_hooks(on: bool):
        nonlocal attached
        if on and not attached:
            state.attach(model)
        elif not on and attached:
            state.detach()
        attached = on

    try:
        for mode in modes:
            fn = fns[mode]
            times = {"pre": [], "post": []}
            for on in (False, True):
                set_hooks(on)
                for _ in range(warmup):
                    fn()
            for i in range(reps):
                order = ("pre", "post") if i % 2 == 0 else ("post", "pre")
                for which in order:
                    set_hooks(which == "post")
                    times[which].append(_timed(fn, device))
            pre, post = statistics.median(times["pre"]), statistics.median(times["post"])
            results[mode] = {"pre_s": pre, "post_s": post, "ratio": post / pre, "times": times}
    finally:
        set_hooks(True)
    results["setup"] = {"batch": batch, "seq_len": seq_len, "gen_prompt_len": gen_prompt_len,
                        "new_tokens": new_tokens, "reps": reps, "device": str(device),
                        "dtype": str(next(model.parameters()).dtype),
                        "gates": sorted({h.gate for h in state.layers.values()}),
                        "layers": {l: {"rank": h.rank, "dense": h.is_dense, "num_keys": h.num_keys}
                                   for l, h in state.layers.items()}}
    return results


def bench_speed(model, tok, hparams, n_edits: int = 1000, batch_size: int = 10, reps: int = 7,
                gates: Sequence[str] = ("paper", "calibrated"), out: Optional[str] = None, table: bool = True,
                **latency_kw) -> dict:
    """Synthesize `n_edits` on `model` (unless it already carries CoachHooK state), measure the latency ratios
    under each gate, report the model's state bytes and the state-bytes table; optionally write JSON to `out`."""
    from .method import get_state

    state = get_state(model)
    synthesized = state is None
    if synthesized:
        state = synthesize_edits(model, hparams, n_edits, batch_size=batch_size, tok=tok)
    report = {"n_edits": n_edits if synthesized else None, "synthesized": synthesized, "latency": {}}
    active = {l: h.gate for l, h in state.layers.items()}
    try:
        for gate in gates:
            state.set_gate(gate)
            report["latency"][gate] = latency_ratios(model, reps=reps, **latency_kw)
    finally:
        for l, h in state.layers.items():
            h.gate = active[l]
    report["state_bytes"] = state.state_nbytes()
    report["state_bytes_table"] = state_bytes_table() if table else {}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1, default=str))
    return report


def format_report(report: dict) -> str:
    lines = []
    for gate, lat in report["latency"].items():
        for mode in ("prompt", "generate"):
            if mode in lat:
                r = lat[mode]
                lines.append(f"{gate:10s} {mode:8s} pre {r['pre_s'] * 1e3:9.2f} ms  post {r['post_s'] * 1e3:9.2f} ms  "
                             f"ratio {r['ratio']:.3f}")
    lines.append(f"state bytes of this model: {report['state_bytes'] / 1e6:,.1f} MB")
    if report["state_bytes_table"]:
        lines.append(format_state_table(report["state_bytes_table"]))
    return "\n".join(lines)
