"""``coachhook bench`` / ``python -m coachhook_plugin.bench``: the Hydra application.

    coachhook bench data=PATH methods=[CoachHooK,MEMIT] num_edits=N batch_size=10 protocol=consecutive \
        model=smollm2-135m out=DIR

``data=`` and ``model=`` take a config-group option (``counterfact`` / ``zsre``; ``smollm2-135m`` ...) or,
as a convenience, a file / model path: ``data=PATH`` becomes ``data=<its format> data.path=PATH`` and
``model=PATH_OR_ID`` becomes ``model=custom model.name=PATH_OR_ID`` before Hydra parses the overrides.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

LOG = logging.getLogger("coachhook.bench")
CONF_DIR = Path(__file__).resolve().parent / "conf"
REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------- command line
def _options(group: str) -> List[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def rewrite_overrides(argv: Sequence[str]) -> List[str]:
    """``data=PATH`` / ``model=PATH_OR_ID`` shorthands → config-group option + field (see module doc)."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key == "data" and value not in _options("data") and "," not in value:
            from .data import detect_format

            path = Path(value).expanduser()
            fmt = "counterfact"
            if path.exists():
                try:
                    raw = json.loads(path.read_text())
                    fmt = detect_format(raw[:1]) if isinstance(raw, list) and raw else fmt
                except (ValueError, OSError):
                    pass
            out += [f"data={fmt}", f"data.path={value}"]
        elif eq and key == "model" and value not in _options("model") and "," not in value:
            out += ["model=custom", f"model.name={value}"]
        else:
            out.append(arg)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the Hydra app with ``argv`` (default: ``sys.argv[1:]``) as overrides / Hydra flags."""
    import hydra

    argv = rewrite_overrides(list(sys.argv[1:] if argv is None else argv))
    holder: Dict[str, object] = {}

    @hydra.main(config_path=str(CONF_DIR), config_name="bench", version_base="1.3")
    def _app(cfg):
        holder["results"] = run_bench(cfg)

    saved = sys.argv
    sys.argv = ["coachhook-bench"] + argv
    try:
        _app()
    finally:
        sys.argv = saved
    return 0


# ------------------------------------------------------------------------------- resolution
def shared_dir(cfg) -> Path:
    if cfg.shared_dir:
        return Path(cfg.shared_dir).expanduser()
    env = os.environ.get("COACHHOOK_SHARED")
    return Path(env) if env else REPO.parent / "shared"


def hparams_dir(cfg) -> Path:
    if cfg.hparams_dir:
        return Path(cfg.hparams_dir).expanduser()
    return REPO / "hparams" if (REPO / "hparams").is_dir() else Path.cwd() / "hparams"


def hparams_path(cfg, key: str) -> Path:
    settings = cfg.method_settings[key]
    if settings.hparams:
        return Path(settings.hparams).expanduser()
    return hparams_dir(cfg) / settings.hparams_folder / f"{cfg.model.hparams_name}.yaml"


def data_path(cfg) -> Path:
    return Path(cfg.data.path).expanduser() if cfg.data.path else shared_dir(cfg) / cfg.data.default_file


def output_dir(cfg) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # not under @hydra.main (called from Python): `out` is required
        if not cfg.out:
            raise ValueError("out=DIR is required when run_bench is called outside the Hydra app")
        return Path(cfg.out)


def _progress(enabled: bool):
    from tqdm.auto import tqdm

    def bar(it, desc="", leave=True, **kw):
        return tqdm(it, desc=desc, leave=leave, disable=not enabled, **kw)

    return bar


# ------------------------------------------------------------------------------- the run
def run_bench(cfg) -> Dict:
    """Run every method in ``cfg.methods`` on the same model, records, order, statistics and evaluator;
    write results.json / results.md / PNGs into the output folder; return the results dict."""
    import torch
    from omegaconf import OmegaConf

    from ..easyedit import editor
    from .data import load_records
    from .evaluation import Evaluator
    from .memory import PeakMemory
    from .methods import MethodRunner, register_bench_methods
    from .protocols import MethodRun, checkpoint_set
    from .report import markdown_table, plot, write_json

    register_bench_methods()
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    protocol = cfg.protocol.name
    batch_size = int(cfg.batch_size or cfg.protocol.batch_size)
    unknown = [m for m in cfg.methods if m not in cfg.method_settings]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(cfg.method_settings)} (add one with "
                         f"+method_settings.NAME.alg_name=... +method_settings.NAME.hparams=PATH ...)")
    torch.manual_seed(int(cfg.seed))
    records, skipped = load_records(data_path(cfg), int(cfg.num_edits), fmt=cfg.data.format,
                                    sample=cfg.data.sample, seed=int(cfg.seed), skip_invalid=cfg.data.skip_invalid,
                                    strip_locality_prefix=cfg.data.strip_locality_prefix or "")
    checkpoints = checkpoint_set(len(records), cfg.protocol.checkpoint_every, cfg.protocol.checkpoints) \
        if protocol == "consecutive" else []
    progress = _progress(bool(cfg.progress))
    evaluator = Evaluator(cfg.eval.backend, cfg.eval.generative, cfg.eval.batch_size, cfg.eval.max_new_tokens)

    results: Dict = {"config": {
        "protocol": protocol, "model": cfg.model.name, "data": str(data_path(cfg)), "data_format": cfg.data.format,
        "num_edits": len(records), "batch_size": batch_size, "checkpoints": checkpoints,
        "methods": list(cfg.methods), "seed": int(cfg.seed), "eval": OmegaConf.to_container(cfg.eval),
        "skipped_records": len(skipped), "skipped": skipped[:200],
        "record_indices": [r["index"] for r in records],
        "overrides": OmegaConf.to_container(cfg, resolve=True),
    }, "methods": {}}
    per_record: Dict[str, List] = {}

    def load_base():
        model, tok = editor.load_model_and_tokenizer(cfg.model.name)
        return model, tok

    templates = None
    reference_taken = False
    for key in progress(list(cfg.methods), desc="methods"):
        settings = cfg.method_settings[key]
        entry: Dict = {"label": settings.label, "alg_name": settings.alg_name}
        results["methods"][key] = entry
        try:
            model, tok = load_base()
            if cfg.shared_context_templates and templates is None:
                from ..method import generate_context_templates

                fixed = cfg.model.get("context_templates")  # a model's measured choice, e.g. SmolLM2: ["{}"]
                templates = list(fixed) if fixed else generate_context_templates(model, tok, seed=int(cfg.seed))
                results["config"]["context_templates"] = templates
            path = hparams_path(cfg, key)
            runner = MethodRunner(key, settings, path, cfg.model.name, device=cfg.device,
                                  stats_dir=cfg.stats.stats_dir,
                                  context_templates=templates if cfg.shared_context_templates else None)
            if not reference_taken:  # the pre-edit locality answers, once, on the base model
                # (EasyEdit's evaluation backend reads hparams.device and max_length: any method's hparams will do)
                evaluator.take_reference(model, tok, records, hparams=runner.hparams,
                                         model_name=editor.model_display_name(model))
                reference_taken = True
            entry["hparams"] = str(path)
            from .methods import hparams_dict

            entry["hparams_values"] = hparams_dict(runner.hparams)
            if runner.needs_stats:
                _ensure_statistics(cfg, runner, model, tok)
            runner.start(model, tok)
            run = MethodRun(runner, evaluator, progress, checkpoint_sample=cfg.protocol.get("checkpoint_sample"),
                            seed=int(cfg.seed))
            device = next(runner.model.parameters()).device
            with PeakMemory(device) as mem:
                final = run.run(protocol, records, batch_size, checkpoints)
            entry.update({"final": final, "curve": run.curve, "seconds_per_edit": run.edit_seconds / len(records),
                          "edit_seconds": run.edit_seconds, "eval_seconds": run.eval_seconds,
                          "peak_memory_bytes": float(mem.peak_bytes), "peak_memory_kind": mem.kind,
                          "failed_edits": run.failures, "notes": run.notes})
            per_record[key] = run.per_record
        except Exception as exc:  # noqa: BLE001 — one broken method must not hide the others' results
            LOG.exception("method %s failed", key)
            entry["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            runner = model = tok = None
        write_json(out / "results.json", results)  # after every method: a partial run still leaves results

    write_json(out / "results.json", results)
    write_json(out / "per_record.json", per_record)
    (out / "results.md").write_text(markdown_table(results))
    results["plots"] = [str(p) for p in plot(results, out)]
    write_json(out / "results.json", results)
    LOG.info("results in %s", out)
    print(f"results: {out / 'results.json'}, {out / 'results.md'}", file=sys.stderr)
    return results


def _ensure_statistics(cfg, runner, model, tok) -> None:
    """λ·E[kkᵀ] files where the method's hparams point (EasyEdit's layout), from local text, never a download."""
    from ..stats import ensure_stats, statistics_texts

    hp = runner.hparams
    corpus = cfg.stats.corpus
    if corpus == "model":
        path = None
    else:
        path = Path(corpus).expanduser() if corpus else shared_dir(cfg) / "data/corpus/wikitext-2-raw-test.txt"
    texts = statistics_texts(model, tok, path, hp.mom2_n_samples, seed=int(cfg.seed))
    ensure_stats(model, tok, hp, texts, max_length=int(cfg.stats.max_length))
