"""Every preference format becomes pairs of whole conversations; bad rows are refused or dropped and counted."""

import json

import pytest
from conftest import needs_shared_data
from datasets import Dataset
from transformers import AutoTokenizer

from gptpipe.data.preferences import convert_pairs, convert_unpaired, tokenize_pairs
from gptpipe.errors import UserError

U, A = "user", "assistant"


def pairs_of(fmt, rows, invalid="error"):
    out = convert_pairs(Dataset.from_list(rows), fmt, "prefs.jsonl", invalid)
    return [(r["chosen"], r["rejected"], r["margin"]) for r in out]


def msg(role, content):
    return {"role": role, "content": content}


def test_explicit_prompt_strings_and_messages():
    assert pairs_of("preference", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}]) == [
        ([msg(U, "2+2?"), msg(A, "4")], [msg(U, "2+2?"), msg(A, "5")], 0.0)
    ]
    row = {"prompt": [msg(U, "2+2?")], "chosen": [msg(A, "4")], "rejected": [msg(A, "5")], "margin": 1.5}
    assert pairs_of("preference", [row]) == [
        ([msg(U, "2+2?"), msg(A, "4")], [msg(U, "2+2?"), msg(A, "5")], 1.5)
    ]


def test_implicit_prompt_and_prompt_repeated_inside_replies():
    whole = {"chosen": [msg(U, "Hi"), msg(A, "Hello!")], "rejected": [msg(U, "Hi"), msg(A, "Go away.")]}
    assert pairs_of("preference", [whole])[0][:2] == (whole["chosen"], whole["rejected"])
    ultrafeedback_like = {"prompt": "Hi", **whole}  # the prompt also opens chosen/rejected: not added twice
    assert pairs_of("preference", [ultrafeedback_like])[0][:2] == (whole["chosen"], whole["rejected"])


def test_sharegpt_preference():
    row = {
        "conversations": [{"from": "human", "value": "Capital of France?"}],
        "chosen": {"from": "gpt", "value": "Paris."},
        "rejected": {"from": "gpt", "value": "Lyon."},
    }
    assert pairs_of("sharegpt_preference", [row]) == [
        (
            [msg(U, "Capital of France?"), msg(A, "Paris.")],
            [msg(U, "Capital of France?"), msg(A, "Lyon.")],
            0.0,
        )
    ]


def test_ranked_expands_to_every_ordered_pair():
    pairs = pairs_of("ranked", [{"prompt": "Q", "responses": ["best", "good", "bad"]}])
    assert [(c[-1]["content"], r[-1]["content"]) for c, r, _ in pairs] == [
        ("best", "good"),
        ("best", "bad"),
        ("good", "bad"),
    ]


BAD_ROWS = [
    (
        {"prompt": "Q", "chosen": "same", "rejected": "same"},
        "row 0: field 'chosen': is identical to rejected",
    ),
    ({"prompt": "Q", "chosen": "A", "rejected": None}, "row 0: field 'rejected': is missing or empty"),
    ({"prompt": "  ", "chosen": "A", "rejected": "B"}, "row 0: field 'prompt': the prompt is empty"),
]


@pytest.mark.parametrize("row, message", BAD_ROWS)
def test_bad_rows_are_errors_by_default(row, message):
    with pytest.raises(UserError) as err:
        pairs_of("preference", [row])
    assert str(err.value).startswith("prefs.jsonl: " + message)
    assert "invalid_pairs: drop" in str(err.value)


def test_bad_rows_dropped_and_counted_when_asked(capsys):
    good = {"prompt": "Q", "chosen": "yes", "rejected": "no"}
    pairs = pairs_of("preference", [good, *[row for row, _ in BAD_ROWS]], invalid="drop")
    assert len(pairs) == 1
    assert "prefs.jsonl: dropped 3 invalid rows of 4; first: row 1:" in capsys.readouterr().out


def test_missing_column_is_always_an_error():
    with pytest.raises(UserError, match="format preference needs field 'rejected'"):
        pairs_of("preference", [{"prompt": "Q", "chosen": "A"}])


def test_tokenize_pairs_truncates_on_the_chosen_side(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ds = convert_pairs(
        Dataset.from_list([{"prompt": "word " * 50, "chosen": "Yes.", "rejected": "No."}]), "preference", "x"
    )
    full = tokenize_pairs(ds, tok, None)[0]
    left = tokenize_pairs(ds, tok, 16, "left")[0]
    right = tokenize_pairs(ds, tok, 16, "right")[0]
    assert len(full["chosen_ids"]) > 16 and left["chosen_truncated"]
    assert left["chosen_ids"] == full["chosen_ids"][-16:]  # keeps the reply being judged
    assert right["chosen_ids"] == full["chosen_ids"][:16]
    assert tok.decode(left["chosen_ids"]).endswith("<|assistant|>Yes.<|end|>")


def test_shared_dpo_demo_converts():
    data = needs_shared_data("dpo_en_demo.json")
    rows = json.loads(data.read_text())
    pairs = pairs_of("sharegpt_preference", rows, invalid="drop")
    assert len(pairs) >= 0.95 * len(rows)
    assert all(c[-1]["role"] == "assistant" and c[:-1] == r[:-1] for c, r, _ in pairs)


def test_kto_reads_unpaired_rows_and_comparisons_split_in_two():
    """KTO's rows: prompt, completion (messages), label. Format unpaired as it is (strings become messages); any
    comparison format split into its chosen reply (desirable) and its rejected one (undesirable); bad rows named."""
    from gptpipe.data.preferences import convert_unpaired

    rows = [
        {"prompt": "2+2?", "completion": "4", "label": True},
        {"prompt": "2+2?", "completion": "5", "label": False},
    ]
    out = convert_unpaired(Dataset.from_list(rows), None, "kto.jsonl")
    assert out[0] == {"prompt": [msg(U, "2+2?")], "completion": [msg(A, "4")], "label": True}
    assert out[1]["label"] is False
    split = convert_unpaired(
        Dataset.from_list([{"prompt": "2+2?", "chosen": "4", "rejected": "5"}]), None, "p.jsonl"
    )
    assert sorted((r["completion"][0]["content"], r["label"]) for r in split) == [("4", True), ("5", False)]
    assert all(r["prompt"] == [msg(U, "2+2?")] for r in split)
    words = [{"prompt": "2+2?", "completion": "4", "label": "yes"}]
    with pytest.raises(
        UserError, match=r"kto.jsonl: row 0: field 'label': expected true \(a desirable reply\)"
    ):
        convert_unpaired(Dataset.from_list(words), "unpaired", "kto.jsonl")
    bad = [*rows, {"prompt": "2+2?", "completion": None, "label": True}]
    with pytest.raises(UserError, match="kto.jsonl: row 2: field 'completion': is missing or empty"):
        convert_unpaired(Dataset.from_list(bad), "unpaired", "kto.jsonl")
    assert len(convert_unpaired(Dataset.from_list(bad), "unpaired", "kto.jsonl", invalid="drop")) == 2
    with pytest.raises(UserError, match="format unpaired needs field 'label'"):
        convert_unpaired(Dataset.from_list([{"prompt": "x", "completion": "y"}]), "unpaired", "kto.jsonl")


def test_conversational_unpaired_rows_split_into_prompt_and_judged_reply(tmp_path):
    """KTO's conversational unpaired rows (TRL's, LLaMA-Factory's kto_en_demo.json): the last assistant turn is the
    completion, the turns before it the prompt; kto_tag as the label column; a row with no final assistant turn
    is named by file and row."""
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    rows = [
        {"messages": [*chat, {"role": "assistant", "content": "Hello."}], "kto_tag": True},
        {"messages": [*chat, {"role": "assistant", "content": "GO AWAY"}], "kto_tag": False},
    ]
    out = convert_unpaired(Dataset.from_list(rows), None, "kto.json")
    assert out[0]["prompt"] == chat and out[0]["completion"] == [{"role": "assistant", "content": "Hello."}]
    assert [r["label"] for r in out] == [True, False]
    bad = [*rows, {"messages": chat, "kto_tag": True}]  # ends on the user's turn: nothing to judge
    with pytest.raises(
        UserError, match=r"kto.json: row 2: field 'messages.1.role': expected the conversation to end"
    ):
        convert_unpaired(Dataset.from_list(bad), "unpaired", "kto.json")
