"""CoachHooK: consecutive batch model editing with hook layers (Li et al., 2024), as an EasyEdit plugin.

    import coachhook_plugin            # "CoachHooK" is registered with EasyEdit when easyeditor is imported
    from coachhook_plugin import CoachHooKHyperParams, apply_coachhook_to_model
"""
from ._version import __version__  # a leaf module: the state files (persistence) read it too
from .hparams import CoachHooKHyperParams, HyperParamsError
from .edit_requests import RequestError
from .method import StaleRestoreError, apply_coachhook_to_model, get_state, remove_coachhook
from .stats import StatsError
from .persistence import PersistenceError, UndoError, load_coachhook, save_coachhook, undo_coachhook

__all__ = ["CoachHooKHyperParams", "HyperParamsError", "RequestError", "StatsError", "apply_coachhook_to_model",
           "get_state", "remove_coachhook", "register", "save_coachhook", "load_coachhook", "undo_coachhook",
           "PersistenceError", "UndoError", "StaleRestoreError"]


def register() -> bool:
    """Register CoachHooK with whichever EasyEdit is importable (idempotent); False if there is none."""
    try:
        from .easyedit.registry import register as _register
    except ImportError:
        return False
    return _register()


def _register_when_easyeditor_is_imported() -> None:
    try:
        register()
    except Exception as exc:  # registration must never break `import easyeditor`, nor fail silently
        from .easyedit.registry import warn_registration_failed

        warn_registration_failed(exc, what="registering CoachHooK")


# Lazily: importing EasyEdit takes seconds, so `import coachhook_plugin` (and `coachhook --help`) does not; the
# registration runs the moment easyeditor is imported (now, if it already is), before any BaseEditor can exist.
from .easyedit.import_hook import when_easyeditor_imported  # noqa: E402

when_easyeditor_imported(_register_when_easyeditor_is_imported)
