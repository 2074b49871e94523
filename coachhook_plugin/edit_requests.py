"""Edit requests: validation (all before any state changes) and tokenisation helpers.

EasyEdit hands requests as dicts: {"prompt", "subject", "target_new" (str, or {"str": …} in ROME's
format), "ground_truth", …}; the prompt contains the subject verbatim (or a "{}" where it goes).
Texts are never passed through str.format, so prompts may contain braces.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch


class RequestError(ValueError):
    """A request is malformed; nothing was edited."""


@dataclass(frozen=True)
class EditRequest:
    prompt: str  # full text, subject included
    subject: str
    target: str  # with a leading space, as MEMIT tokenises targets
    subject_start: int  # character span of the subject inside `prompt`
    case_id: Optional[object] = None

    @property
    def subject_end(self) -> int:
        return self.subject_start + len(self.subject)


def _text(value, what: str, i: int) -> str:
    if isinstance(value, dict) and "str" in value:
        value = value["str"]
    if not isinstance(value, str):
        raise RequestError(f"request {i}: {what} must be a string, got {type(value).__name__}")
    return value


def _truths(value, i: int) -> List[str]:
    """The ground truth(s) of a request: absent, a string, ROME's {"str": …}, or a list (ZsRE's answers)."""
    if value is None:
        return []
    if isinstance(value, dict) and "str" in value:
        value = value["str"]
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if not isinstance(v, str):
            raise RequestError(f"request {i}: ground_truth must be a string (or a list of strings), got "
                               f"{type(v).__name__}")
    return list(values)


def prepare_requests(requests: Sequence[Dict]) -> List[EditRequest]:
    if isinstance(requests, dict):
        requests = [requests]
    if not requests:
        raise RequestError("no requests given: pass at least one {'prompt', 'subject', 'target_new'} dict")
    out, seen = [], {}
    for i, r in enumerate(requests):
        if not isinstance(r, dict):
            raise RequestError(f"request {i}: expected a dict with 'prompt', 'subject', 'target_new', "
                               f"got {type(r).__name__}")
        for key in ("prompt", "subject", "target_new"):
            if key not in r:
                raise RequestError(f"request {i}: missing {key!r}")
        prompt = _text(r["prompt"], "prompt", i)
        subject = _text(r["subject"], "subject", i)
        target = _text(r["target_new"], "target_new", i)
        if not subject.strip():
            raise RequestError(f"request {i}: subject is empty")
        if not target.strip():
            raise RequestError(f"request {i}: target_new is empty or whitespace; give the new object, e.g. ' Paris'")
        if "{}" in prompt:
            prompt = prompt.replace("{}", subject, 1)
        start = prompt.find(subject)
        if start < 0:
            raise RequestError(f"request {i}: subject {subject!r} does not occur in prompt {prompt!r}; the "
                               f"subject must appear verbatim (or write '{{}}' where it goes)")
        for truth in _truths(r.get("ground_truth"), i):
            if truth.strip() and truth.strip() == target.strip():
                raise RequestError(f"request {i}: target_new {target!r} equals the ground truth; nothing to edit")
        if not target.startswith(" "):
            target = " " + target
        key = (prompt, subject)
        if key in seen and seen[key] == target:
            raise RequestError(f"request {i}: duplicate of an earlier request in the same batch ({prompt!r} -> "
                               f"{target!r}); remove the duplicate")
        if key in seen:
            raise RequestError(f"request {i}: conflicts with an earlier request in the same batch: same prompt "
                               f"{prompt!r} and subject, but target {target!r} instead of {seen[key]!r}; keep one "
                               f"target per fact")
        seen[key] = target
        out.append(EditRequest(prompt, subject, target, start, r.get("case_id")))
    return out


# ----------------------------------------------------------------------------- data files
#: the prefix of ZsRE's locality questions in MEND's files (the CoachHooK paper strips it)
ZSRE_LOCALITY_PREFIX = "nq question: "


def record_format(r: Dict) -> Optional[str]:
    """'zsre' (MEND format: src, alt, ...), 'counterfact' (EasyEdit format: prompt, target_new, ...) or None."""
    if "src" in r and "alt" in r:
        return "zsre"
    if "prompt" in r and "target_new" in r:
        return "counterfact"
    return None


def request_from_record(r: Dict, index: int, strip_locality_prefix: str = "") -> Dict:
    """One record of an EasyEdit data file as an edit request with EasyEdit's keys (prompt, subject, target_new,
    ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth) and a case_id (the record's own, else
    `index`). A field the record lacks is None: validation says what is wrong with it."""
    fmt = record_format(r)
    if fmt == "zsre":
        answers = r.get("answers")
        if isinstance(answers, list):
            answers = answers[0] if answers else r.get("pred")
        loc = r.get("loc")
        if strip_locality_prefix and isinstance(loc, str) and loc.startswith(strip_locality_prefix):
            loc = loc[len(strip_locality_prefix):]
        req = dict(prompt=r["src"], subject=r.get("subject"), target_new=r["alt"], ground_truth=answers,
                   rephrase_prompt=r.get("rephrase"), locality_prompt=loc, locality_ground_truth=r.get("loc_ans"))
    elif fmt == "counterfact":
        req = {k: r.get(k) for k in ("prompt", "subject", "target_new", "ground_truth", "rephrase_prompt",
                                     "locality_prompt", "locality_ground_truth")}
    else:
        raise RequestError(f"record {index} has keys {sorted(r)}; expected CounterFact's (prompt, subject, "
                           f"target_new, ...) or ZsRE's (src, subject, alt, answers, ...)")
    req["case_id"] = r["case_id"] if r.get("case_id") is not None else index
    return req


def read_records(path) -> List[Dict]:
    """The records of an EasyEdit data file (a JSON list of objects)."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"data file {path} not found") from None
    except ValueError as e:
        raise RequestError(f"{path} is not a JSON file ({e}); give an EasyEdit CounterFact or ZsRE JSON list") from e
    if not isinstance(records, list):
        raise RequestError(f"{path} holds a JSON {type(records).__name__}; expected a list of edit records")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise RequestError(f"{path}: record {i} is a {type(r).__name__}, expected an object")
    return records


def load_requests(path, num_edits: Optional[int] = None) -> List[Dict]:
    """Edit requests from an EasyEdit data file, first `num_edits` records (all when None): CounterFact (EasyEdit
    format) or ZsRE (MEND format), see `request_from_record`."""
    records = read_records(path)
    if num_edits is not None:
        if int(num_edits) < 1:
            raise RequestError(f"num_edits must be >= 1, got {num_edits}")
        records = records[:int(num_edits)]
    try:
        out = [request_from_record(r, i) for i, r in enumerate(records)]
    except RequestError as e:
        raise RequestError(f"{path}: {e}") from None
    ids = [q["case_id"] for q in out]
    if len(set(map(repr, ids))) != len(ids):
        raise RequestError(f"{path}: case_id values repeat; every record needs its own case_id (or none at all)")
    return out


# ----------------------------------------------------------------------------- tokenisation
def fill_template(template: str, text: str) -> Tuple[str, int]:
    """template with its '{}' replaced by text, and the character offset where text starts."""
    at = template.index("{}")
    return template[:at] + text + template[at + 2:], at


def encode(tok, text: str) -> Tuple[List[int], Optional[List[Tuple[int, int]]]]:
    """Token ids (with the tokenizer's usual special tokens) and character offsets when available."""
    if getattr(tok, "is_fast", False):
        enc = tok(text, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    return list(tok(text)["input_ids"]), None


def token_index_of_char(tok, text: str, char_end: int) -> Tuple[List[int], int]:
    """ids of text and the index of the token holding character char_end − 1 (the subject's last char)."""
    ids, offsets = encode(tok, text)
    if offsets is not None:
        for j, (a, b) in enumerate(offsets):
            if a < char_end <= b and b > a:
                return ids, j
    # slow tokenizers (or odd offsets): MEMIT's rule, the length of the tokenised prefix minus one
    prefix_ids = list(tok(text[:char_end])["input_ids"])
    return ids, min(len(prefix_ids), len(ids)) - 1


def fact_token_index(tok, text: str, subject_end: int, fact_token: str = "subject_last") -> Tuple[List[int], int]:
    """ids of text and the index of the token edits read and write (hparams `fact_token`, MEMIT's names):
    "subject_last" the subject's last token (it ends at character `subject_end`), "last" the text's last token."""
    if fact_token == "last":
        ids, _ = encode(tok, text)
        return ids, len(ids) - 1
    if fact_token != "subject_last":
        raise ValueError(f"fact_token must be 'subject_last' or 'last', got {fact_token!r}")
    return token_index_of_char(tok, text, subject_end)


def target_ids(tok, target: str) -> List[int]:
    ids = list(tok(target, add_special_tokens=False)["input_ids"])
    if not ids:
        raise RequestError(f"target {target!r} tokenises to nothing")
    return ids


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask; right padding keeps every position index where it was."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def pad_id_of(tok) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tok, attr, None)
        if v is not None:
            return int(v)
    return 0
