"""Edit records for the benchmark: CounterFact and ZsRE in EasyEdit's formats, read in place.

Every record becomes one CounterFact-shaped dict (``prompt, subject, target_new, ground_truth,
rephrase_prompt, locality_prompt, locality_ground_truth``) through ``edit_requests.request_from_record`` (the
package's one reader of both formats). ZsRE (MEND format) has its ``nq question: `` prefix stripped from the
locality prompt, as the CoachHooK paper does. Here: the same filter, sampling and order for every method.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..edit_requests import ZSRE_LOCALITY_PREFIX, RequestError, read_records, record_format, request_from_record

FIELDS = ("prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
          "locality_ground_truth")


class DataError(ValueError):
    pass


def detect_format(raw: List[Dict]) -> str:
    fmt = record_format(raw[0]) if raw and isinstance(raw[0], dict) else None
    if fmt is None:
        first = raw[0] if raw and isinstance(raw[0], dict) else {}
        raise DataError(f"unknown record format with fields {sorted(first)}; expected CounterFact "
                        f"(prompt, target_new, ...) or ZsRE (src, alt, ...) in EasyEdit's format")
    return fmt


def problem_of(r: Dict) -> Optional[str]:
    """Why no editing method could take this record (or None). The same filter for every method."""
    for k in FIELDS:
        if not isinstance(r.get(k), str) or not r[k].strip():
            return f"empty or missing {k}"
    if r["subject"] not in r["prompt"]:
        return "subject not in prompt"
    if r["target_new"].strip() == r["ground_truth"].strip():
        return "target_new equals ground_truth"
    return None


def load_records(path, num_edits: int, fmt: str = "auto", sample: str = "first", seed: int = 0,
                 skip_invalid: bool = True, strip_locality_prefix: str = ZSRE_LOCALITY_PREFIX
                 ) -> Tuple[List[Dict], List[Dict]]:
    """(records, skipped): the first ``num_edits`` usable records (or a seeded sample), in file order.

    ``skipped`` lists the records left out as ill-formed for editing (with the reason), so the report
    can say how many there were; duplicate prompts are left out too (an edit cannot have two answers)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} not found; pass data=PATH to a CounterFact or ZsRE json "
                        f"(here: ../shared/data/counterfact/counterfact-edit.json)")
    try:
        raw = read_records(path)
    except RequestError as e:
        raise DataError(str(e)) from None
    if not raw:
        raise DataError(f"{path} must hold a non-empty JSON list of records")
    fmt = detect_format(raw) if fmt == "auto" else fmt
    order = list(range(len(raw)))
    if sample == "random":
        random.Random(seed).shuffle(order)
    elif sample != "first":
        raise DataError(f"data.sample must be 'first' or 'random', not {sample!r}")
    records, skipped, prompts = [], [], set()
    for i in order:
        if record_format(raw[i]) != fmt:
            raise DataError(f"{path}: record {i} is not in the {fmt} format of the records before it")
        rec = request_from_record(raw[i], i, strip_locality_prefix if fmt == "zsre" else "")
        rec["index"] = i
        why = problem_of(rec) or ("duplicate prompt" if rec["prompt"] in prompts else None)
        if why and skip_invalid:
            skipped.append({"index": i, "reason": why})
            continue
        prompts.add(rec["prompt"])
        records.append(rec)
        if len(records) == num_edits:
            break
    if len(records) < num_edits:
        raise DataError(f"{path} has only {len(records)} usable records, fewer than num_edits={num_edits}")
    return records, skipped


def run_records(config: Dict) -> List[Dict]:
    """The records a bench run edited, in the order it edited them, from its results.json ``config`` (the data
    file and the record indices it kept); for the diagnostics that split a finished run's scores."""
    indices = config["record_indices"]
    records = load_records(config["data"], len(indices))[0]  # the bench's default sampling: the first usable ones
    if [r["index"] for r in records] != list(indices):
        raise DataError(f"the first {len(indices)} usable records of {config['data']} are not the ones this run "
                        f"edited (a random sample, or another file); point the diagnostic at the run's data file")
    return records


def easyedit_request(rec: Dict) -> Dict:
    """The request dict EasyEdit's ``BaseEditor._prepare_requests`` builds (what ``apply_*`` and
    ``compute_edit_quality`` read)."""
    return {"prompt": rec["prompt"], "target_new": rec["target_new"], "ground_truth": rec["ground_truth"],
            "subject": rec["subject"], "rephrase_prompt": rec["rephrase_prompt"], "case_id": rec["case_id"],
            "portability": {},
            "locality": {"neighborhood": {"prompt": rec["locality_prompt"],
                                          "ground_truth": rec["locality_ground_truth"]}}}
