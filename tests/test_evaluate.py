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


def test_generation_decodes_prompts_of_one_length_together_as_each_alone(gpt2_tok):
    """Batched generative reliability: prompts of equal token length share a generate call (no padding); each
    gets the text it gets alone, and is scored against its own target."""
    from coachhook_plugin import apply_coachhook_to_model
    from coachhook_plugin.evaluate import generation_contains
    from conftest import FACTS, tiny_hparams

    model = build_tiny("llama", init_range=0.3)
    apply_coachhook_to_model(model, gpt2_tok, FACTS, tiny_hparams("llama"), progress=None)  # the hooks are live
    prompts = ["The capital of Zorbia is", "The capital of Morbia is", "Alice Moreau works as a",
               "The mother tongue of Kenji Tanabe is", "Bob is", "Carl is", "Dana is"]
    alone = []
    for p in prompts:
        ids = gpt2_tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=3, pad_token_id=gpt2_tok.eos_token_id)
        alone.append(gpt2_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    assert len(set(alone)) == len(alone), f"pick prompts the tiny model continues differently: {alone}"
    lengths = [len(gpt2_tok(p)["input_ids"]) for p in prompts]
    assert len(set(lengths)) < len(lengths) and len(set(lengths)) > 1  # shared lengths and distinct ones
    assert generation_contains(model, gpt2_tok, prompts, alone, max_new_tokens=3, batch_size=2) == [1.0] * 7
    shifted = alone[1:] + alone[:1]  # another prompt's text: a miss, unless rows were mixed up
    assert generation_contains(model, gpt2_tok, prompts, shifted, max_new_tokens=3, batch_size=2) == [0.0] * 7


def test_teacher_forced_chunks_by_length_keep_each_record_its_scores(gpt2_tok):
    """Records are batched in order of length; every score still lands on its own record, as scored alone."""
    from coachhook_plugin.evaluate import answer_token_scores

    model = build_tiny("gpt2", init_range=0.3)
    prompts = ["The mother tongue of Kenji Tanabe is", "Bob is", "The capital of Zorbia is", "Alice works as a",
               "Mount Kelvar is located in the continent of"]
    answers = [" French", " a pilot of planes", " Paris", " nurse", " Europe"]
    alone = [answer_token_scores(model, gpt2_tok, [p], [a], batch_size=1) for p, a in zip(prompts, answers)]
    preds, probs = answer_token_scores(model, gpt2_tok, prompts, answers, batch_size=2)
    assert [len(x) for x in preds] == [len(a[0][0]) for a in alone] and len(set(map(len, preds))) > 1
    for (pred_1, prob_1), pred, prob in zip(alone, preds, probs):
        assert torch.equal(pred_1[0], pred)
        assert torch.allclose(prob_1[0], prob, atol=1e-5)
