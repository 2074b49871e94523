"""Where EasyEdit's ``run.log`` and ``results.json`` go (default: nowhere, instead of ``./logs`` in the cwd)."""
from __future__ import annotations

import contextlib
import logging
import os
import types
from typing import Dict, Iterator, Optional


from .imports import easyeditor_module


_LOG_DIR: Optional[str] = None
_LOGS_DIR_NAMES = ("logs", "./logs", "logs/", "./logs/")


class _LogsDirPath(types.ModuleType):
    """``os.path`` as EasyEdit's ``summary_metrics`` sees it under :func:`results_file_compat`."""

    def __init__(self, target: Optional[str]):
        super().__init__("os.path")
        self._target = target

    def __getattr__(self, name):
        return getattr(os.path, name)

    def exists(self, path):
        if path in _LOGS_DIR_NAMES:
            return True if self._target is None else os.path.exists(self._target)
        return os.path.exists(path)

    def join(self, path, *rest):
        if path in _LOGS_DIR_NAMES:
            return os.devnull if self._target is None else os.path.join(self._target, *rest)
        return os.path.join(path, *rest)


class _LogsDirOs(types.ModuleType):
    """``os`` as EasyEdit's ``summary_metrics`` sees it: ``./logs`` is the configured log directory, or
    nowhere (the results file goes to ``os.devnull``)."""

    def __init__(self, target: Optional[str]):
        super().__init__("os")
        self._target = target
        self.path = _LogsDirPath(target)

    def __getattr__(self, name):
        return getattr(os, name)

    def makedirs(self, path, *args, **kwargs):
        if path in _LOGS_DIR_NAMES:
            if self._target is not None:
                os.makedirs(self._target, exist_ok=True)
            return None
        return os.makedirs(path, *args, **kwargs)


@contextlib.contextmanager
def results_file_compat() -> Iterator[None]:
    """Scoped: newer EasyEdit's ``summary_metrics`` (called by ``edit``) writes ``./logs/results.json`` into
    the working directory; like ``run.log`` it goes to :func:`set_log_dir`'s directory, or nowhere."""
    utils = easyeditor_module("easyeditor.editors.utils")
    summary = getattr(utils, "summary_metrics", None)
    module_globals = getattr(summary, "__globals__", None)
    if module_globals is None or module_globals.get("os") is not os:
        yield
        return
    module_globals["os"] = _LogsDirOs(_log_dir())
    try:
        yield
    finally:
        module_globals["os"] = os
_log_handlers: Dict[str, logging.Handler] = {}


def set_log_dir(path: Optional[os.PathLike]) -> None:
    """Where EasyEdit's ``run.log`` goes. ``None`` (the default, unless ``COACHHOOK_EASYEDIT_LOG_DIR``
    is set) writes no file; EasyEdit itself writes ``./logs/run.log`` relative to the cwd."""
    global _LOG_DIR
    _LOG_DIR = None if path is None else os.fspath(path)


def _log_dir() -> Optional[str]:
    return _LOG_DIR if _LOG_DIR is not None else (os.environ.get("COACHHOOK_EASYEDIT_LOG_DIR") or None)


def make_logs_replacement(editor_module):
    """EasyEdit's ``make_logs`` adds a file handler on ``./logs/run.log`` and a stream handler to its
    logger on *every* editor construction. Ours adds each handler at most once and writes the file
    only when a log directory is configured."""

    def make_logs():
        logger = getattr(editor_module, "LOG", None)
        if logger is None:
            return
        fmt = logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s")
        if "stream" not in _log_handlers:
            _log_handlers["stream"] = logging.StreamHandler()
            _log_handlers["stream"].setFormatter(fmt)
        if _log_handlers["stream"] not in logger.handlers:
            logger.addHandler(_log_handlers["stream"])
        target = _log_dir()
        if target:
            os.makedirs(target, exist_ok=True)
            path = os.path.abspath(os.path.join(target, "run.log"))
            if path not in _log_handlers:
                _log_handlers[path] = logging.FileHandler(path)
                _log_handlers[path].setFormatter(fmt)
            if _log_handlers[path] not in logger.handlers:
                logger.addHandler(_log_handlers[path])

    return make_logs
