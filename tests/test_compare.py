"""The same prompts across stages: base vs SFT side by side, diversity figures, reproducible sampling."""

import pytest
from conftest import trained_phrasing_prompts

from gptpipe.compare import CompareSettings, compare_models, distinct_n, markdown
from gptpipe.config import DataSource


def test_distinct_n_counts_repeats_within_each_prompt():
    same = [[[1, 2, 3], [1, 2, 3]]]  # two identical samples: 3 unique unigrams of 6
    varied = [[[1, 2, 3], [4, 5, 6]]]
    assert distinct_n(same, 1) == 0.5 and distinct_n(same, 2) == 0.5
    assert distinct_n(varied, 1) == 1.0 and distinct_n(varied, 2) == 1.0
    assert distinct_n(same + varied, 1) == 0.75  # averaged over prompts
    assert distinct_n([[[7]]], 2) is None  # no bigram at all


@pytest.fixture(scope="module")
def compared(tiny_base, tiny_sft, tmp_path_factory):
    asked = trained_phrasing_prompts(tmp_path_factory.mktemp("compare") / "asked.jsonl")
    settings = CompareSettings(
        prompts=DataSource(path=str(asked)),  # questions the SFT model answers; the RL prompts it rarely does
        num_prompts=3,
        diversity_prompts=12,
        samples=4,
        max_new_tokens=20,
        seed=3,
    )
    models = [("base", "pretrain", tiny_base), ("sft", "sft", tiny_sft)]
    return compare_models(models, settings), compare_models(models, settings)


def test_sft_answers_as_an_assistant_where_the_base_model_continues_a_document(compared):
    found, _ = compared
    base, sft = found["stages"]["base"], found["stages"]["sft"]
    # The base model may well write the right fact, but it does not stop: it goes on with the document.
    assert sft["answered_and_stopped"] > base["answered_and_stopped"]
    assert sft["stopped"] > base["stopped"] and sft["length"] < base["length"]
    for stage in (base, sft):
        assert 0 < stage["distinct_1"] <= 1 and 0 < stage["distinct_2"] <= 1 and stage["entropy"] > 0
        assert len(stage["answers"]) == 3


def test_sampling_is_reproducible_under_a_fixed_seed(compared):
    first, again = compared
    assert first == again


def test_report_section_shows_answers_side_by_side_and_diversity(compared):
    text = markdown(compared[0])
    assert "| prompt | base | sft |" in text
    assert text.count("\n| base |") == 1 and text.count("\n| sft |") == 1  # one figures row per stage
    assert "distinct-2" in text and "entropy" in text
