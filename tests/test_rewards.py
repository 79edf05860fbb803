"""Reward functions with TRL's signature: loaded from a module or a file, checked on every call (a function that
raises, returns the wrong length or a non-number fails naming itself and the row), weighted like TRL."""

import pytest

from gptpipe.data.tinyworld import answer_reward
from gptpipe.errors import UserError
from gptpipe.rewards import load_reward_functions, weighted_sum

PROMPTS = [[{"role": "user", "content": "Where does Pezu live?"}]] * 2
COMPLETIONS = [
    [{"role": "assistant", "content": "Pezu lives in Cairo."}],
    [{"role": "assistant", "content": "No."}],
]

BAD = {
    "raises": "def reward(prompts, completions, **kw):\n    raise KeyError('answer')\n",
    "short": "def reward(prompts, completions, **kw):\n    return [1.0]\n",
    "string": "def reward(prompts, completions, **kw):\n    return ['good' for _ in completions]\n",
    "nan": "def reward(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n",
}
EXPECTED = {
    "raises": "raised KeyError",
    "short": "returned 1 values for 2 completions",
    "string": "row 0: expected a float or None, got str 'good'",
    "nan": "row 0: nan is not a finite number",
}


def test_the_tiny_world_answer_check_is_a_reward_function():
    assert answer_reward(PROMPTS, COMPLETIONS, answer=["Cairo", "Cairo"]) == [1.0, 0.0]
    assert answer_reward(PROMPTS, ["Cairo, of course.", "Lima."], answer=["Cairo", "Cairo"]) == [1.0, 0.0]
    (checked,) = load_reward_functions(["gptpipe.data.tinyworld:answer_reward"])
    assert checked.__name__ == "answer_reward"  # TRL logs rewards/<name>
    assert checked(prompts=PROMPTS, completions=COMPLETIONS, answer=["Cairo", "Cairo"]) == [1.0, 0.0]


def test_a_function_from_a_file_gets_the_dataset_columns(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(
        "def brevity(prompts, completions, completion_ids=None, kind=None, **kw):\n"
        "    return [None if k == 'skip' else -float(len(c)) for c, k in zip(completion_ids, kind)]\n"
    )
    (fn,) = load_reward_functions([f"{path}:brevity"])
    got = fn(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=[[1, 2, 3], [4]], kind=["city", "skip"])
    assert got == [-3.0, None]
    assert weighted_sum([[1.0, 2.0], got], [0.5, 2.0]) == [0.5 - 6.0, 1.0]  # None adds nothing (as TRL)


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_reward_function_is_named_with_what_it_did(name, tmp_path):
    path = tmp_path / f"{name}.py"
    path.write_text(BAD[name])
    (fn,) = load_reward_functions([f"{path}:reward"])
    with pytest.raises(UserError, match=f"reward function {path}:reward.*{EXPECTED[name]}"):
        fn(prompts=PROMPTS, completions=COMPLETIONS)


def test_reward_functions_that_cannot_be_loaded_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="reward_funcs.0: .*missing.py not found"):
        load_reward_functions([f"{tmp_path}/missing.py:reward"])
    with pytest.raises(UserError, match="reward_funcs.0: cannot import 'gptpipe.data.tinyworld:nothing'"):
        load_reward_functions(["gptpipe.data.tinyworld:nothing"])
    with pytest.raises(UserError, match="expected 'module:function' or 'path/to/file.py:function'"):
        load_reward_functions(["answer_reward"])
    with pytest.raises(UserError, match="reward_weights: 1 weights for 2 rewards"):
        weighted_sum([[1.0], [2.0]], [1.0])
