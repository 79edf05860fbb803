"""Tokenizer stage: train a byte-level BPE tokenizer and save it as a Hugging Face tokenizer.

    gptpipe train recipes/tiny/tokenizer.yaml

Byte-level BPE (GPT-2 style) never meets an unknown character, so decoding is lossless. Special tokens:
``<|bos|>`` (prepended to every sequence), ``<|end|>`` (end of a document *and* end of a chat turn —
one token, so a chat model stops where the base model learned that text ends), ``<|pad|>``, and a
token per chat role. The chat template wraps assistant turns in ``{% generation %}`` so TRL can train
on assistant tokens only. Evidence (``eval.json``): round trip on held-out text and bytes per token.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from gptpipe.config import TokenizerConfig
from gptpipe.data import chat_templates
from gptpipe.data.sources import load_train_eval, text_row_check
from gptpipe.runs import Run

BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = [t for t in chat_templates.GPTPIPE.special_tokens if t != EOS]
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS]  # PAD first: id 0
HELDOUT_FRACTION = 0.05  # held out for the evidence when the recipe names no eval data


def main(cfg: TokenizerConfig, run: Run) -> dict:
    if not cfg.eval_datasets and cfg.eval_split_size == 0:
        cfg.eval_split_size = HELDOUT_FRACTION
    train, heldout = load_train_eval(cfg, ["text"], text_row_check, seed=cfg.seed)
    if cfg.max_train_documents:
        train = train.select(range(min(cfg.max_train_documents, len(train))))
    print(f"[tokenizer] training byte-level BPE (vocab up to {cfg.vocab_size}) on {len(train)} documents")

    texts = (row["text"] for row in train)
    tokenizer = wrap(train_bpe(texts, len(train), cfg.vocab_size, cfg.min_frequency, cfg.split_digits))
    tmp = run.final_dir()
    tokenizer.save_pretrained(tmp)

    # Evidence from the saved copy, loaded the way every later stage loads it.
    evidence = measure(AutoTokenizer.from_pretrained(tmp), [row["text"] for row in heldout])
    evidence |= {"train_documents": len(train), "seconds": run.seconds()}
    final = run.publish(tmp, evidence)
    verdict = (
        "lossless"
        if evidence["roundtrip_lossless"]
        else f"LOSSY on {evidence['roundtrip_failures']} documents"
    )
    print(
        f"[tokenizer] saved {final} (vocab {evidence['vocab_size']}); held-out round trip {verdict}, "
        f"{evidence['bytes_per_token']:.2f} bytes/token"
    )
    return evidence


def train_bpe(
    texts, length: int, vocab_size: int, min_frequency: int, split_digits: bool = False
) -> Tokenizer:
    """Train byte-level BPE on an iterator of strings; ``split_digits``: no merge ever joins two digits, so
    a number is the same digit tokens wherever it appears (after a space, inside JSON, alone). A space before
    a number stays on its first digit (" 812" is " 8", "1", "2"), as GPT-2's pre-tokenizer keeps a word's
    space: with the space a token of its own, the first digit follows a token that says nothing of where it
    stands, and the tiny model never learned to copy a number's first digit into a tool call (docs/tools.md:
    0.34 of the held-out calculator questions, against 1.00 with the space kept on the digit). Every script's
    decimal digits split alike (Arabic-Indic, Devanagari...), as the ``Digits`` pre-tokenizer did."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        digits = pre_tokenizers.Split(Regex(r" ?\p{Nd}"), behavior="isolated")  # any script's digits
        tok.pre_tokenizer = pre_tokenizers.Sequence([digits, tok.pre_tokenizer])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(
                trim_offsets=False
            ),  # keep exact character offsets (assistant masks use them)
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return tok


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """A transformers tokenizer with the special tokens and chat template set."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=ROLE_TOKENS,
        chat_template=chat_templates.GPTPIPE.template,
        response_template=chat_templates.GPTPIPE.response_template,
        clean_up_tokenization_spaces=False,  # cleanup would change the text: decoding must be lossless
    )


def measure(tokenizer, texts: list[str]) -> dict:
    """Round-trip and compression on held-out texts."""
    failures, n_bytes, n_tokens = 0, 0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        failures += tokenizer.decode(ids) != text
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(ids)
    return {
        "roundtrip_lossless": failures == 0,
        "roundtrip_failures": failures,
        "heldout_documents": len(texts),
        "heldout_bytes": n_bytes,
        "heldout_tokens": n_tokens,
        "bytes_per_token": n_bytes / max(n_tokens, 1),
        "vocab_size": len(tokenizer),
    }
