"""`coachhook train MEND|SERAC`: EasyEdit's learned editors trained with EasyEdit's own trainer, offline, on the CPU.

    coachhook train MEND --hparams hparams/TRAINING/MEND/smollm2-135m.yaml --data zsre --max-steps 2000
    coachhook train SERAC --hparams hparams/TRAINING/SERAC/smollm2-135m.yaml --data zsre

The archive goes to $COACHHOOK_CACHE/editors/<ALG>/<hparams stem>-<data>.pt (never into git), the file
hparams/<ALG>/smollm2-135m.yaml names; a second call reuses it (--force retrains). The logic lives in
coachhook_plugin.easyedit.training.
"""
from __future__ import annotations

import sys


def add_arguments(p) -> None:
    p.add_argument("alg", choices=["MEND", "SERAC"], help="the editor to train")
    p.add_argument("--hparams", default=None,
                   help="training yaml, EasyEdit's layout (default: hparams/TRAINING/<ALG>/smollm2-135m.yaml)")
    p.add_argument("--data", default="zsre",
                   help="zsre | counterfact (the train splits in $COACHHOOK_SHARED/data) or a train file path")
    p.add_argument("--max-steps", type=int, default=None, help="training steps (default: the yaml's max_iters)")
    p.add_argument("--val-size", type=int, default=100,
                   help="records held out from the end of the train file as EasyEdit's validation set")
    p.add_argument("--train-size", type=int, default=None, help="use only the first N training records")
    p.add_argument("--out", default=None, help="archive path (default: $COACHHOOK_CACHE/editors/<ALG>/<hparams stem>-<data>.pt)")
    p.add_argument("--force", action="store_true", help="retrain even if the archive exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    from pathlib import Path

    from .easyedit.training import TrainingError, train_editor

    hparams = args.hparams or str(Path(__file__).resolve().parents[1] / "hparams" / "TRAINING" / args.alg /
                                  "smollm2-135m.yaml")
    try:
        result = train_editor(args.alg, hparams, data=args.data, out=args.out, max_steps=args.max_steps,
                              val_size=args.val_size, train_size=args.train_size, force=args.force,
                              progress=not args.no_progress, log=lambda line: print(line, flush=True))
    except (TrainingError, FileNotFoundError, ValueError) as e:
        print(f"coachhook train: error: {e}", file=sys.stderr)
        return 2
    print(result["archive"], flush=True)
    return 0
