"""Side-by-side benchmark of CoachHooK and EasyEdit's baselines (a Hydra app): ``coachhook bench ...``.

``main(argv)`` runs the app with Hydra overrides; ``run_bench(cfg)`` runs one composed config."""
from .app import main, rewrite_overrides, run_bench

__all__ = ["main", "rewrite_overrides", "run_bench"]
