"""The batched evaluator scores teacher-forced accuracy as EasyEdit defines it."""
import torch

from coachhook_plugin.evaluate import agreement, answer_predictions, token_accuracy
from conftest import build_tiny


def test_token_accuracy_is_one_for_the_models_own_greedy_answer(gpt2_tok):
    model = build_tiny("gpt2")
    prompts = ["The capital of Zorbia is", "Mount Kelvar is located in a"]
    answers = []
    for p in prompts:  # two greedy tokens from the model, as text
        ids = gpt2_tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=2, pad_token_id=gpt2_tok.eos_token_id)
        answers.append(gpt2_tok.decode(out[0, ids.shape[1]:]))
    same = [(p, a) for p, a in zip(prompts, answers) if gpt2_tok(a, add_special_tokens=False)["input_ids"] ==
            gpt2_tok(" " + a.lstrip(), add_special_tokens=False)["input_ids"]]  # re-tokenises the same way
    assert same, "no greedy answer re-tokenises identically; pick other prompts"
    assert token_accuracy(model, gpt2_tok, [p for p, _ in same], [a for _, a in same]) == [1.0] * len(same)
    assert token_accuracy(model, gpt2_tok, prompts, [" zzzz qqqq", " xylophone"]) != [1.0, 1.0]
    preds = answer_predictions(model, gpt2_tok, prompts, [" Paris", " Peru"])
    assert agreement(preds, preds) == [1.0, 1.0]
