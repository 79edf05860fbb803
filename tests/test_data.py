"""Data layer: sources, column mapping, mixtures, splits, clear errors for bad data; the tiny world."""

import json

import pytest

from gptpipe.config import DataSettings, DataSource
from gptpipe.data import tinyworld
from gptpipe.data.sources import load_mixture, load_train_eval, text_row_check
from gptpipe.errors import UserError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_local_formats_and_column_mapping(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"content": f"doc {i}"} for i in range(4)])
    b = tmp_path / "b.txt"
    b.write_text("line one\nline two\n")
    ds = load_mixture(
        [DataSource(path=str(a), columns={"text": "content"}), DataSource(path=str(b))],
        ["text"],
        text_row_check,
    )
    assert sorted(ds["text"]) == ["doc 0", "doc 1", "doc 2", "doc 3", "line one", "line two"]


def test_mixture_weights_scale_each_source(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(10)])
    ds = load_mixture([DataSource(path=str(a), weight=2.0), DataSource(path=str(b), weight=0.5)], ["text"])
    texts = ds["text"]
    assert sum(t.startswith("a") for t in texts) == 20 and sum(t.startswith("b") for t in texts) == 5
    again = load_mixture([DataSource(path=str(a), weight=2.0), DataSource(path=str(b), weight=0.5)], ["text"])
    assert again["text"] == texts  # deterministic for a seed


def test_eval_split_fraction(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(100)])
    train, held = load_train_eval(
        DataSettings(datasets=[DataSource(path=str(a))], eval_split_size=0.1), ["text"]
    )
    assert len(train) == 90 and len(held) == 10 and not set(train["text"]) & set(held["text"])


def test_missing_file_names_the_key(tmp_path):
    settings = DataSettings(datasets=[DataSource(path=str(tmp_path / "nope.jsonl"))])
    with pytest.raises(UserError, match=r"datasets.0.path: file not found: .*nope.jsonl"):
        load_train_eval(settings, ["text"])


def test_empty_dataset_names_the_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match=r"empty.jsonl.*(empty|could not be read)"):
        load_mixture([DataSource(path=str(empty))], ["text"])


def test_missing_field_and_bad_row_name_file_row_field(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"body": "x"}])
    with pytest.raises(
        UserError,
        match=r"d.jsonl: no field 'text' \(columns are \['body'\]\); map yours with `columns: \{text: <your column>\}`",
    ):
        load_mixture([DataSource(path=str(f))], ["text"], text_row_check)
    g = write_jsonl(tmp_path / "g.jsonl", [{"text": "ok"}, {"text": "fine"}, {"other": "no text here"}])
    with pytest.raises(UserError, match=r"g.jsonl: row 2: field 'text' is missing or null"):
        load_mixture([DataSource(path=str(g))], ["text"], text_row_check)
    h = write_jsonl(tmp_path / "h.jsonl", [{"text": "ok"}, {"text": 7}])
    with pytest.raises(UserError, match=r"h.jsonl: row 1: field 'text' must be a string, got int"):
        load_mixture([DataSource(path=str(h))], ["text"], text_row_check)
    with pytest.raises(UserError, match=r"columns.text names column 'nope'"):
        load_mixture([DataSource(path=str(g), columns={"text": "nope"})], ["text"])


def test_tinyworld_is_deterministic_and_holds_out_questions():
    one, two = tinyworld.generate(0), tinyworld.generate(0)
    assert one == two
    assert tinyworld.generate(1)["sft"]["train"] != one["sft"]["train"]
    train_q = {m["messages"][0]["content"] for m in one["sft"]["train"]}
    eval_q = {m["messages"][0]["content"] for m in one["sft"]["eval"]}
    assert eval_q and not train_q & eval_q
    # Held-out questions ask about facts that pretraining documents state.
    corpus = " ".join(d["text"] for d in one["pretrain"]["train"])
    assert all(row["answer"] in corpus for row in one["sft"]["eval"])
    # Held-out comparisons use a phrasing never used in training.
    train_p = {r["prompt"][0]["content"] for r in one["comparisons"]["train"]}
    assert not train_p & {r["prompt"][0]["content"] for r in one["comparisons"]["eval"]}
    assert {r["mistake"] for r in one["comparisons"]["train"]} == {"wrong_value", "off_style", "irrelevant"}
    # RL prompts ask with a phrasing in no training data; train and eval ask about different facts, the unseen
    # split about the eval half with a phrasing in no data at all, RL's included.
    rl = one["rl_prompts"]
    asked = {split: {r["prompt"][0]["content"] for r in rl[split]} for split in rl}
    sft_asked = {m["messages"][0]["content"] for part in ("train", "eval") for m in one["sft"][part]}
    assert not (asked["train"] | asked["eval"]) & sft_asked and len(rl["train"]) == len(rl["eval"]) == 130
    facts = {split: {(r["kind"], r["reference"]) for r in rl[split]} for split in rl}
    assert not facts["train"] & facts["eval"] and facts["eval"] == facts["unseen"]
    assert sum(r["kind"] == "sum" for r in rl["train"]) == 50
    pairs = one["comparisons"]["train"] + one["comparisons"]["eval"]
    texts = corpus + " ".join(r["prompt"][0]["content"] for r in pairs)
    assert not any(q in texts for q in asked["train"] | asked["eval"])
    texts += " ".join(asked["train"] | asked["eval"])
    assert not any(q in texts for q in asked["unseen"]) and len(asked["unseen"]) == 130
    # The demo's extra pretraining documents ask in the RL phrasing about the RL half only, never the held-out half.
    extra = " ".join(d["text"] for d in one["pretrain"]["asked"])
    assert len(one["pretrain"]["asked"]) == 40 and sum(q in extra for q in asked["train"]) >= 40
    assert not any(q in extra for q in asked["eval"] | asked["unseen"])
    # The demo's extra comparisons: RL training prompts only, the reference over a true statement about someone else
    # (another person's fact with another value; a nearby sum with another total).
    others = one["comparisons"]["asked"]
    assert len(others) == 520 and {r["prompt"][0]["content"] for r in others} == asked["train"]
    by_prompt = {r["prompt"][0]["content"]: r for r in rl["train"]}
    value_of = {r["reference"]: r["answer"] for r in rl["train"]}
    for pair in others:
        row = by_prompt[pair["prompt"][0]["content"]]
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert chosen == row["reference"]
        if row["kind"] == "sum":
            a, _, b, _, total = rejected.rstrip(".").split()
            assert int(a) + int(b) == int(total) != int(row["answer"])
        else:
            assert value_of[rejected] != row["answer"] and rejected.split()[0] != chosen.split()[0]


def test_tinyworld_cli_writes_every_part(tmp_path, capsys):
    from gptpipe.cli import run

    run(["data", "tinyworld", "--out", str(tmp_path / "tw")])
    for part in tinyworld.PARTS:
        for split in ("train", "eval"):
            assert (tmp_path / "tw" / part / f"{split}.jsonl").stat().st_size > 0
    assert "pretrain: train 4000, eval 200, asked 40 rows" in capsys.readouterr().out
