"""Edit metrics as EasyEdit defines them, computed in batches on whatever state the model is in now.

rewrite / rephrase accuracy: teacher-forced — the share of target tokens the model predicts (argmax) at
each target position given the prompt and the target's previous tokens (EasyEdit's `compute_edit_quality`);
locality: the share of those argmax tokens on the locality prompt + its answer that equal the pre-edit
model's. Plus generative reliability: greedy decoding with the KV cache, does the output contain the target.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from .edit_requests import pad_id_of, pad_right
from .models import model_device


def _join(tok, prompt: str, answer: str):
    p = list(tok(prompt)["input_ids"])
    a = list(tok(answer if answer.startswith(" ") else " " + answer, add_special_tokens=False)["input_ids"])
    return p, a


@torch.no_grad()
def _teacher_forced(model, tok, pairs, batch_size: int, with_probs: bool = False):
    """One batched forward per chunk: the argmax token at each answer position and, if asked, the probability
    the model gives each answer token. Chunks are formed in order of length, so little of a chunk is padding."""
    device = model_device(model)
    argmax: List[Optional[torch.Tensor]] = [None] * len(pairs)
    probs: List[Optional[torch.Tensor]] = [None] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        ids, mask = pad_right([pairs[i][0] + pairs[i][1][:-1] for i in chunk], pad_id_of(tok), device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        for row, i in enumerate(chunk):
            p, a = pairs[i]
            scores = logits[row, torch.arange(len(p) - 1, len(p) - 1 + len(a), device=device)]
            argmax[i] = scores.argmax(-1).cpu()
            if with_probs:
                probs[i] = scores.float().softmax(-1)[torch.arange(len(a), device=device),
                                                      torch.tensor(a, device=device)].cpu()
    return argmax, (probs if with_probs else [])


def _predict(model, tok, pairs, batch_size: int) -> List[torch.Tensor]:
    return _teacher_forced(model, tok, pairs, batch_size)[0]


def answer_predictions(model, tok, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 16
                       ) -> List[torch.Tensor]:
    """Argmax token at each answer position (teacher forcing), one tensor per (prompt, answer)."""
    return _predict(model, tok, [_join(tok, p, a) for p, a in zip(prompts, answers)], batch_size)


def token_accuracy(model, tok, prompts, answers, batch_size: int = 16) -> List[float]:
    pairs = [_join(tok, p, a) for p, a in zip(prompts, answers)]
    preds = _predict(model, tok, pairs, batch_size)
    return [float((pred == torch.tensor(a)).float().mean()) for pred, (_, a) in zip(preds, pairs)]


def agreement(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> List[float]:
    return [float((a == b).float().mean()) for a, b in zip(before, after)]


@torch.no_grad()
def generation_contains(model, tok, prompts, targets, max_new_tokens: int = 8, batch_size: int = 32) -> List[float]:
    """Greedy decoding with the KV cache; 1.0 if the target string appears in the new text.

    Prompts of the same token length are decoded together (up to `batch_size` at a time), so no prompt is
    padded: each one is decoded as it would be alone."""
    device = model_device(model)
    encoded = [tok(p)["input_ids"] for p in prompts]
    by_length: Dict[int, List[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    texts: List[str] = [""] * len(prompts)
    for group in by_length.values():
        for s in range(0, len(group), batch_size):
            chunk = group[s:s + batch_size]
            ids = torch.tensor([encoded[i] for i in chunk], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id_of(tok))
            for i, row in zip(chunk, out[:, ids.shape[1]:]):
                texts[i] = tok.decode(row, skip_special_tokens=True)
    return [1.0 if t.strip() and t.strip() in text else 0.0 for t, text in zip(targets, texts)]


def evaluate_records(model, tok, records: Sequence[Dict], locality_reference: Optional[List[torch.Tensor]] = None,
                     generative: bool = False) -> Dict[str, float]:
    """Mean reliability / generality / locality over CounterFact-style records on the current model."""
    rel = token_accuracy(model, tok, [r["prompt"] for r in records], [r["target_new"] for r in records])
    gen = token_accuracy(model, tok, [r["rephrase_prompt"] for r in records], [r["target_new"] for r in records])
    res = {"reliability": sum(rel) / len(rel), "generality": sum(gen) / len(gen)}
    if locality_reference is not None:
        loc_now = answer_predictions(model, tok, [r["locality_prompt"] for r in records],
                                     [r["locality_ground_truth"] for r in records])
        loc = agreement(locality_reference, loc_now)
        res["locality"] = sum(loc) / len(loc)
    if generative:
        g = generation_contains(model, tok, [r["prompt"] for r in records], [r["target_new"] for r in records])
        res["generative_reliability"] = sum(g) / len(g)
    return res


def locality_reference(model, tok, records: Sequence[Dict]) -> List[torch.Tensor]:
    return answer_predictions(model, tok, [r["locality_prompt"] for r in records],
                              [r["locality_ground_truth"] for r in records])


@torch.no_grad()
def answer_token_scores(model, tok, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 16):
    """Teacher-forced scores per (prompt, answer): (argmax token at each answer position, the probability the
    model gives each answer token). The probabilities are a continuous view of the same forward pass as
    `token_accuracy` — they move with any change of the model, where an accuracy may stay at 0 or 1."""
    return _teacher_forced(model, tok, [_join(tok, p, a) for p, a in zip(prompts, answers)], batch_size,
                           with_probs=True)
