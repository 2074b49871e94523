"""`fact_token: last` (MEMIT's name): keys and values are read and written at the prompt's last token instead of
the subject's last token; `subject_last` stays the default and unchanged."""
import pytest
import torch

from coachhook_plugin import HyperParamsError, apply_coachhook_to_model, get_state
from coachhook_plugin.edit_requests import (fact_token_index, fill_template, prepare_requests, target_ids,
                                            token_index_of_char)
from coachhook_plugin.keys import capture, compute_keys_and_hidden
from coachhook_plugin.values import _value_batch
from conftest import FACTS, build_tiny, tiny_hparams


def test_fact_token_index(gpt2_tok):
    text = "The capital of Zorbia is"
    end = text.index("Zorbia") + len("Zorbia")
    ids, last = fact_token_index(gpt2_tok, text, end, "last")
    assert last == len(ids) - 1 == len(gpt2_tok(text)["input_ids"]) - 1
    assert fact_token_index(gpt2_tok, text, end, "subject_last") == token_index_of_char(gpt2_tok, text, end)
    assert fact_token_index(gpt2_tok, text, end, "subject_last")[1] < last  # " is" follows the subject
    with pytest.raises(ValueError, match="fact_token"):
        fact_token_index(gpt2_tok, text, end, "subject_first")


def test_keys_and_values_read_the_prompts_last_token(gpt2_tok):
    model = build_tiny("gpt2")
    hp = tiny_hparams("gpt2")
    reqs = prepare_requests(FACTS)
    key_module = hp.rewrite_module_tmp.format(1)
    block = hp.layer_module_tmp.format(2)
    K_last, H_last = compute_keys_and_hidden(model, gpt2_tok, reqs, ["{}"], key_module, block, fact_token="last")
    K_subj, _ = compute_keys_and_hidden(model, gpt2_tok, reqs, ["{}"], key_module, block)
    for i, r in enumerate(reqs):  # independently: run the raw prompt alone, read its last position
        ids = torch.tensor([gpt2_tok(r.prompt)["input_ids"]])
        with torch.no_grad(), capture(model, inputs_of=[key_module], outputs_of=[block]) as store:
            model(input_ids=ids)
        assert torch.allclose(K_last[:, i], store[("in", key_module)][0, -1].float(), atol=1e-5)
        assert torch.allclose(H_last[:, i], store[("out", block)][0, -1].float(), atol=1e-5)
        assert not torch.allclose(K_last[:, i], K_subj[:, i])  # every FACTS prompt goes on after its subject
    # values: the rewrite rows and the KL row ("{subject} is a") all look up their last prompt token
    seqs, lookups, _, tgt = _value_batch(gpt2_tok, reqs[0], ["{}", "Hello. {}"], "last")
    for seq, at, t in zip(seqs, lookups, ["{}", "Hello. {}"]):
        assert at == len(gpt2_tok(fill_template(t, reqs[0].prompt)[0])["input_ids"]) - 1
        assert len(seq) == at + 1 + len(tgt) - 1
    assert lookups[-1] == len(seqs[-1]) - 1


def _target_log_prob(model, tok, req):
    """log p(first target token | the raw prompt), read at the prompt's last token."""
    ids = torch.tensor([tok(req.prompt)["input_ids"]])
    with torch.no_grad():
        return float(torch.log_softmax(model(input_ids=ids).logits[0, -1], dim=-1)[target_ids(tok, req.target)[0]])


def test_an_edit_with_fact_token_last_writes_at_the_last_token(gpt2_tok):
    reqs = prepare_requests(FACTS[:2])
    deltas, gains = {}, {}
    for fact_token in ("subject_last", "last"):
        model = build_tiny("gpt2")
        before = [_target_log_prob(model, gpt2_tok, r) for r in reqs]
        hp = tiny_hparams("gpt2", fact_token=fact_token, mom2_update_weight=1e-2, v_num_grad_steps=20)
        apply_coachhook_to_model(model, gpt2_tok, FACTS[:2], hp, progress=None)
        deltas[fact_token] = {l: h.delta.clone() for l, h in get_state(model).layers.items()}
        gains[fact_token] = [_target_log_prob(model, gpt2_tok, r) - b for r, b in zip(reqs, before)]
    assert any(not torch.allclose(deltas["last"][l], deltas["subject_last"][l]) for l in deltas["last"])
    # written where the target is predicted, the edit raises p(target) far more than one written at the subject
    # (on this seeded tiny model: +0.39 and +0.33 nats against +0.019 and +0.005)
    assert min(gains["last"]) > 0.2 and min(gains["last"]) > 5 * max(gains["subject_last"])


def test_unknown_fact_token_is_refused():
    with pytest.raises(HyperParamsError, match="fact_token"):
        tiny_hparams("gpt2", fact_token="subject_first").validate()
