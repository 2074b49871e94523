"""examples/locality_edited_facts.py: which locality prompts ask for a fact that the same run edited."""
from conftest import load_example


def test_a_probe_of_an_edited_fact_is_found_and_near_misses_are_not():
    asked = load_example("locality_edited_facts").edited_facts_asked
    edited = [dict(index=288, subject="Windows 98", ground_truth="Microsoft"),
              dict(index=7, subject="Windows", ground_truth="Apple"),
              dict(index=9, subject="Athens", ground_truth="Greece")]
    probe = dict(index=343, locality_prompt="Windows 98, a product of", locality_ground_truth="Microsoft")
    assert asked(probe, edited) == ["Windows 98"]  # "Windows" is named too, but its old answer is not expected
    # the subject inside a longer word does not count, nor does the record's own edit
    assert asked(dict(index=1, locality_prompt="Athenschool is in", locality_ground_truth="Greece"), edited) == []
    assert asked(dict(index=9, locality_prompt="Athens is in", locality_ground_truth="Greece"), edited) == []
    assert asked(dict(index=2, locality_prompt="Athens is in", locality_ground_truth="Greece"), edited) == ["Athens"]
