"""`coachhook` console script.

    coachhook stats --hparams hparams/CoachHooK/smollm2-135m.yaml --corpus ../shared/data/corpus/wikitext-2-raw-test.txt
"""
from __future__ import annotations

import argparse
import sys
import time


def _stats(args) -> int:
    from .hparams import CoachHooKHyperParams
    from .models import load_model_and_tokenizer
    from .stats import ensure_stats, statistics_texts

    hp = CoachHooKHyperParams.from_hparams(args.hparams)
    if args.n_samples is not None:
        hp.mom2_n_samples = args.n_samples
    if args.stats_dir is not None:
        hp.stats_dir = args.stats_dir
    model, tok = load_model_and_tokenizer(args.model or hp.model_name)
    hp.validate_for_model(model)
    # offline default without --corpus: the model's own text, seeded
    texts = statistics_texts(model, tok, args.corpus or None, hp.mom2_n_samples, seed=args.seed)()
    if not texts:
        print(f"no text found in {args.corpus}", file=sys.stderr)
        return 2
    start = time.time()
    paths = ensure_stats(model, tok, hp, texts, max_length=args.max_length)
    for p in paths:
        print(p)
    print(f"{len(texts)} texts, {time.time() - start:.1f} s", file=sys.stderr)
    return 0


def _demo_arguments(p):
    from .demo import add_arguments

    add_arguments(p)


def _speed_arguments(p):
    from .speed import add_arguments

    add_arguments(p)


def _speed(args) -> int:
    from .speed import main as speed_main

    return speed_main(args)


def _demo(args) -> int:
    from .demo import main as demo_main

    return demo_main(args)


def _edit(args) -> int:
    from .runs import edit_run
    from .stats import StatsError

    try:
        progress = edit_run(args.hparams, args.data, args.out, num_edits=args.num_edits, batch_size=args.batch_size,
                            model_name=args.model, resume=args.resume,
                            log=lambda line: print(line, flush=True))
    except (ValueError, StatsError, FileNotFoundError) as e:  # RequestError, HyperParamsError, RunError, …
        print(f"coachhook edit: error: {e}", file=sys.stderr)
        return 2
    print(f"{progress['batches_done']}/{progress['total_batches']} batches, {progress['num_edits']} edits: "
          f"{args.out}", flush=True)
    return 0


def _train_arguments(p):
    from .train import add_arguments

    add_arguments(p)


def _train(args) -> int:
    from .train import main as train_main

    return train_main(args)


def _bench(overrides) -> int:
    from .bench import main as bench_main

    return bench_main(overrides)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # Hydra parses its own overrides and flags (-m, --help, --cfg job ...)
        return _bench(argv[1:])
    parser = argparse.ArgumentParser(prog="coachhook", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("stats", help="compute λ's covariance statistics E[kkᵀ] from a local text corpus, "
                                      "in EasyEdit's file format (skips files that exist)")
    st.add_argument("--hparams", required=True, help="a CoachHooK (or MEMIT-compatible) hparams yaml")
    st.add_argument("--corpus", default=None,
                    help="a text file, or a folder of .txt files (default: text sampled from the model, seeded)")
    st.add_argument("--seed", type=int, default=0, help="seed for sampled text")
    st.add_argument("--model", default=None, help="override hparams model_name")
    st.add_argument("--n-samples", type=int, default=None, help="paragraphs to use (default: mom2_n_samples)")
    st.add_argument("--stats-dir", default=None, help="override hparams stats_dir")
    st.add_argument("--max-length", type=int, default=256, help="tokens per paragraph")
    st.set_defaults(func=_stats)
    dm = sub.add_parser("demo", help="CoachHooK vs EasyEdit's MEMIT on built-in edits, default model, offline")
    _demo_arguments(dm)
    dm.set_defaults(func=_demo)
    sp = sub.add_parser("bench-speed", help="edit time vs EasyEdit MEMIT, inference overhead and state bytes")
    _speed_arguments(sp)
    sp.set_defaults(func=_speed)
    ed = sub.add_parser("edit", help="apply a CounterFact/ZsRE data file consecutively in batches, with an atomic "
                                     "checkpoint after every batch (--resume continues an interrupted run)")
    ed.add_argument("--hparams", required=True, help="a CoachHooK hparams yaml")
    ed.add_argument("--data", required=True, help="EasyEdit CounterFact or ZsRE (MEND format) JSON file")
    ed.add_argument("--model", default=None, help="override hparams model_name")
    ed.add_argument("--num-edits", type=int, default=None, help="use the first N records (default: all)")
    ed.add_argument("--batch-size", type=int, default=None, help="edits per batch (default: hparams batch_size)")
    ed.add_argument("--out", required=True, help="run folder: state.safetensors + progress.json")
    ed.add_argument("--resume", action="store_true", help="continue the run in --out after its last checkpoint")
    ed.set_defaults(func=_edit)
    tr = sub.add_parser("train", help="train MEND or SERAC with EasyEdit's own trainer, offline, into the cache folder "
                                      "(reused when present)")
    _train_arguments(tr)
    tr.set_defaults(func=_train)
    sub.add_parser("bench", add_help=False,
                   help="CoachHooK side by side with EasyEdit's baselines (a Hydra app: `coachhook bench "
                        "data=PATH methods=[CoachHooK,MEMIT] num_edits=200 protocol=consecutive out=DIR`, "
                        "`coachhook bench --help` for every option)")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
