"""Tokenizer stage: lossless round trip, compression reported, loads with AutoTokenizer, chat template."""

import json

from conftest import needs_shared_data
from transformers import AutoTokenizer

from gptpipe.cli import run


def test_tiny_tokenizer_evidence_and_chat_template(tokenizer_dir):
    evidence = json.loads((tokenizer_dir.parent / "eval.json").read_text())
    assert evidence["roundtrip_lossless"] and evidence["roundtrip_failures"] == 0
    assert evidence["heldout_documents"] == 200
    assert evidence["bytes_per_token"] > 2.5  # names and numbers become single tokens
    assert (tokenizer_dir.parent / "config.yaml").exists()

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|end|>", "<|pad|>")
    text = "Zuno turned 41 this year. 7 + 5 = 12. Ünïcödé 🙂 never seen before"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # byte-level: nothing unknown
    assert tok(text)["input_ids"][0] == tok.bos_token_id

    chat = [
        {"role": "user", "content": "How old is Anna?"},
        {"role": "assistant", "content": "Anna is 34 years old."},
    ]
    rendered = tok.apply_chat_template(chat, tokenize=False)
    assert rendered == "<|bos|><|user|>How old is Anna?<|end|><|assistant|>Anna is 34 years old.<|end|>"
    out = tok.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert (
        tok.decode(marked) == "Anna is 34 years old.<|end|>"
    )  # the answer and its end-of-turn, nothing else


def test_finished_tokenizer_run_is_not_overwritten(tokenizer_dir, capsys):
    import pytest
    from conftest import REPO

    from gptpipe.errors import UserError

    with pytest.raises(UserError, match="holds a finished run"):
        run(["train", str(REPO / "recipes/tiny/tokenizer.yaml"), f"output_dir={tokenizer_dir.parent}"])


def test_wiki_demo_text_trains_a_tokenizer(tmp_path):
    wiki = needs_shared_data("wiki_demo.txt")
    recipe = tmp_path / "tok.yaml"
    recipe.write_text(
        f"stage: tokenizer\noutput_dir: {tmp_path / 'run'}\nvocab_size: 2000\n"
        f"datasets: [{{path: {wiki}}}]\neval_split_size: 0.2\n"
    )
    run(["train", str(recipe)])
    evidence = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert evidence["roundtrip_lossless"]
    assert evidence["bytes_per_token"] > 2.0  # raw bytes would be 1.0; a 2k vocabulary merges common words
    assert evidence["vocab_size"] == 2000


def test_split_digits_gives_a_number_the_same_tokens_everywhere():
    from gptpipe.stages.tokenizer import train_bpe, wrap

    texts = [f"Bo is {n} years old. {n} + {n % 7} = {n + n % 7}. The code is {n}{n}." for n in range(10, 400)]
    arabic = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")  # Arabic-Indic digits: another script's numbers
    texts += [f"Bo is {str(n).translate(arabic)} years old." for n in range(10, 400)]
    merged, split = (wrap(train_bpe(iter(texts), len(texts), 600, 2, split_digits=s)) for s in (False, True))

    def pieces(tok, text):
        return [tok.decode([i]) for i in tok(text, add_special_tokens=False)["input_ids"]]

    merged_pieces = pieces(merged, " is 123, 1234")
    assert any(len(p.strip()) > 1 and p.strip().isdigit() for p in merged_pieces)  # BPE merges digits
    for text in (" is 1489.", '{"a": 1489}', "1489", "(1489)"):
        digits = [p for p in pieces(split, text) if p.strip().isdigit()]
        # a space before the number stays on its first digit, never a token of its own
        assert [p.strip() for p in digits] == ["1", "4", "8", "9"] and " " not in pieces(split, text), text
        assert digits[0] == (" 1" if " 1489" in text else "1") and digits[1:] == ["4", "8", "9"], text
        assert split.decode(split(text, add_special_tokens=False)["input_ids"]) == text  # still lossless
    assert [p for p in pieces(split, " is ١٤٨٩.") if p.strip() not in ("is", ".")] == [" ١", "٤", "٨", "٩"]
