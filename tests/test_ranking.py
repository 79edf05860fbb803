"""On-policy comparisons: samples ranked by a labeler or by people into the reward stage's `ranked` format."""

import json

import pytest
from conftest import REPO

from gptpipe.cli import main, run
from gptpipe.compare import reward_models_on_own_samples
from gptpipe.data import ranking
from gptpipe.data.preferences import from_ranked
from gptpipe.data.tinyworld import label
from gptpipe.errors import UserError

PROMPT = [{"role": "user", "content": "How old is Anna?"}]


def samples(*completions, id=0, **extra):
    return [
        {"id": id, "prompt": PROMPT, "sample": i, "completion": c, **extra} for i, c in enumerate(completions)
    ]


def by_length(rows):  # a known labeler: longer is better
    return [len(r["completion"]) for r in rows]


def test_a_labeler_orders_each_prompt_and_ties_are_not_compared():
    rows = samples("bb", "a", "cccc", "dd", "a") + samples("x", "y", id=1)  # prompt 1: a tie only
    ranked, stats = ranking.rank_samples(rows, by_length)
    # every distinct text kept ("a" twice counts once), "dd" beside "bb" with the same score
    assert ranked == [
        {"id": 0, "prompt": PROMPT, "responses": ["cccc", "bb", "dd", "a"], "scores": [4, 2, 2, 1]}
    ]
    assert stats == {"prompts": 2, "kept": 1, "dropped_fewer_than_two": 1, "unranked": 0, "pairs": 5}
    pairs = from_ranked(ranked[0])  # what the reward stage makes of it: every pair with a winner
    assert [(c[-1]["content"], r[-1]["content"]) for c, r in pairs] == [
        ("cccc", "bb"),
        ("cccc", "dd"),
        ("cccc", "a"),
        ("bb", "a"),
        ("dd", "a"),
    ]  # bb and dd tie: not a pair
    with pytest.raises(ValueError, match="scores"):  # scores must come best first, one per response
        from_ranked({**ranked[0], "scores": [1, 2, 2, 4]})


def test_human_rankings_by_sample_number(tmp_path):
    path = tmp_path / "rankings.jsonl"
    path.write_text(json.dumps({"id": 0, "ranking": [2, 0]}) + "\n")
    ranked, stats = ranking.rank_samples(
        samples("a", "b", "c") + samples("x", "y", id=1), rankings=ranking.read_rankings(path)
    )
    assert ranked[0]["responses"] == ["c", "a"] and stats["unranked"] == 1
    path.write_text(json.dumps({"id": 0, "ranking": [7, 0]}) + "\n")
    with pytest.raises(UserError, match="ranking names sample 7"):
        ranking.rank_samples(samples("a", "b"), rankings=ranking.read_rankings(path))


def test_written_replies_are_ranked_beside_the_samples_and_keep_a_prompt_no_sample_got_right():
    reference = "Anna is 30 years old."
    rows = samples("30.", "Anna is 40 years old.", reference, answer="30", reference=reference)
    rows += samples("Bo is 9.", "9 years.", id=1, answer="4", reference="Bo is 4 years old.")  # none right
    candidates = rows + ranking.written_replies(rows, "reference", number=3, others=1)
    assert [r["sample"] for r in candidates[-4:]] == [3, 4, 3, 4] and candidates[-1]["answer"] == "4"
    ranked, stats = ranking.rank_samples(candidates, label)
    # the sample that wrote the reply word for word counts once; the other prompt's reply is scored as wrong
    assert ranked[0]["responses"] == [reference, "30.", "Anna is 40 years old.", "Bo is 4 years old."]
    assert ranked[0]["scores"] == [2, 1, 0, 0]
    # prompt 1 is kept: its own reply above both samples and above Anna's
    assert ranked[1]["responses"] == ["Bo is 4 years old.", "Bo is 9.", "9 years.", reference]
    assert stats["kept"] == 2 and stats["pairs"] == 5 + 3
    assert ranking.rank_samples(rows, label)[1]["kept"] == 1  # without them, the prompt's samples all tie
    with pytest.raises(UserError, match="prompt 1 has no written reply in 'reference'"):
        ranking.written_replies(rows[:3] + samples("x", id=1, reference=" "), "reference", 3)
    with pytest.raises(UserError, match="there are 2 prompts; give at most 1"):
        ranking.written_replies(rows, "reference", 3, others=2)


def test_rank_refuses_a_reference_column_the_prompts_lack(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "train",
                str(REPO / "recipes/tiny/rank.yaml"),
                f"output_dir={tmp_path / 'rank'}",
                "model.name_or_path=unused-before-the-check",
                "reference_column=gold",
            ]
        )
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "reference_column: 'gold': the prompts have no such column" in err
    assert not (tmp_path / "rank/eval.json").exists() and not (tmp_path / "rank/final").exists()


def test_rejection_sampling_keeps_each_prompts_best_sample_above_min_score(tmp_path):
    """best.jsonl for SFT: the first sample of each prompt's top score (ties too: all tied is still a best), when it
    reaches min_score; with human rankings, the top-ranked one."""
    rows = samples("bb", "a", "cccc", "dd") + samples("x", "y", id=1) + samples("z", id=2)
    best = ranking.best_samples(rows, by_length, None)
    assert [b["messages"] for b in best] == [
        [*PROMPT, {"role": "assistant", "content": c}] for c in ("cccc", "x", "z")
    ]
    assert [
        b["messages"][-1]["content"] for b in ranking.best_samples(rows, by_length, None, min_score=2)
    ] == ["cccc"]
    path = tmp_path / "rankings.jsonl"
    path.write_text(json.dumps({"id": 0, "ranking": [1, 0]}) + "\n")
    ranked_by_people = ranking.best_samples(rows, None, ranking.read_rankings(path))
    assert [b["messages"][-1]["content"] for b in ranked_by_people] == [
        "a"
    ]  # prompts 1, 2: nobody ranked them


def test_tinyworld_labeler_prefers_the_house_style_right_answer():
    rows = samples(
        "Anna is 34 years old.",
        "34, I think.",
        "Anna is 35 years old.",
        answer="34",
        reference="Anna is 34 years old.",
    )
    assert label(rows) == [2.0, 1.0, 0.0]
    with pytest.raises(UserError, match="answer and reference"):
        label(samples("34"))


def test_rank_command_writes_the_ranked_format(tmp_path, capsys):
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in samples("bb", "a")))
    run(["rank", str(path), "--labeler", "test_ranking:by_length"])
    assert "1 of 1 prompts ranked" in capsys.readouterr().out
    assert json.loads((tmp_path / "samples.ranked.jsonl").read_text())["responses"] == ["bb", "a"]
    with pytest.raises(UserError, match="cannot import 'nowhere:fn'"):
        run(["rank", str(path), "--labeler", "nowhere:fn"])
    # a labeler in a file, as reward functions and tools are named: shortest first this time
    (tmp_path / "mine.py").write_text(
        "def shortest(rows):\n    return [-len(r['completion']) for r in rows]\n"
    )
    run(["rank", str(path), "--labeler", f"{tmp_path / 'mine.py'}:shortest"])
    assert json.loads((tmp_path / "samples.ranked.jsonl").read_text())["responses"] == ["a", "bb"]
    with pytest.raises(UserError, match="not found"):
        run(["rank", str(path), "--labeler", f"{tmp_path / 'absent.py'}:shortest"])


def test_rank_stage_ranks_the_sft_models_own_samples(tiny_sft, tiny_reward, tmp_path):
    out = tmp_path / "rank"
    run(
        [
            "train",
            str(REPO / "recipes/tiny/rank.yaml"),
            f"output_dir={out}",
            f"model.name_or_path={tiny_sft}",
            "max_prompts=24",
            "num_samples=4",  # the recipe's 32 make 8 times the samples
            "reference_column=reference",  # each prompt's written reply and two others' ranked beside them
            "other_references=2",
            "eval_datasets=[{path: 'tinyworld:rl_prompts', split: eval, max_samples: 16}]",
        ]
    )
    evidence = json.loads((out / "eval.json").read_text())
    assert evidence["prompts"] == 24 and evidence["samples"] == 96 and evidence["pairs"] >= 1
    assert evidence["heldout_prompts"] == 16
    best = (out / "final" / "best.jsonl").read_text().splitlines()  # rejection sampling's SFT conversations
    assert len(best) == evidence["best_samples"] <= evidence["prompts"]
    rows = [json.loads(line) for line in (out / "final/comparisons.jsonl").read_text().splitlines()]
    assert len(rows) == evidence["kept"] and all(len(r["responses"]) >= 2 for r in rows)
    samples_file = [json.loads(line) for line in (out / "final/samples.jsonl").read_text().splitlines()]
    assert len(samples_file) == 96  # the written replies are ranked, not samples
    by_id = {s["id"]: s for s in samples_file}
    assert evidence["kept"] == 24  # every prompt: its written reply above its wrong samples
    for row in rows:  # best first by the tiny world's labeler, with the real answers, ties marked
        scored = label([{**by_id[row["id"]], "completion": c} for c in row["responses"]])
        assert scored == sorted(scored, reverse=True) == row["scores"] and len(set(scored)) >= 2
        assert row["responses"][0] == by_id[row["id"]]["reference"] and len(row["responses"]) >= 3

    # The report card's section: every finished reward run of the folder scored on the held-out comparisons.
    heldout = out / "final/heldout_comparisons.jsonl"
    assert evidence["heldout_kept"] > 0 and heldout.is_file()  # a fixed seed: the same samples every run
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "reward").symlink_to(tiny_reward.parent)
    section = reward_models_on_own_samples(runs, heldout)
    [line] = [x for x in section.splitlines() if x.startswith("| reward |")]
    accuracy = float(line.rstrip(" |").rsplit("|", 1)[1])
    assert 0.0 <= accuracy <= 1.0
