"""InstructGPT's ptx term in a transformers/TRL trainer (gptpipe.ptx_term: SFT, GRPO, RLOO): a training
micro-batch's loss is the trainer's own plus ptx_coef times the token-mean language-model loss of the ptx rows the
step and micro-batch choose, divided by the accumulation where the trainer divides its own; evaluation takes no
term."""

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_llama_config
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments

from gptpipe.ppo.ptx import collate, encode_examples, ptx_loss_sum, ptx_rows
from gptpipe.ptx_term import with_ptx

WORDS = ["<pad>", "<s>", "</s>", "a", "b", "c", "d", "e"]


def _tokenizer() -> PreTrainedTokenizerFast:
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="e"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", eos_token="</s>", bos_token="<s>"
    )


def test_the_ptx_term_joins_the_trainers_loss_as_the_formula_says(tmp_path):
    tokenizer = _tokenizer()
    rows = [{"text": "a b c d"}, {"text": "b c"}, {"text": "d a b e c"}]
    cfg = SimpleNamespace(ptx_coef=0.5, ptx_max_length=16, seed=3)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(WORDS)))
    args = TrainingArguments(
        tmp_path, per_device_train_batch_size=2, use_cpu=True, report_to="none", max_steps=1
    )
    log: list[float] = []
    trainer_class = with_ptx(Trainer, cfg, tokenizer, rows, 2, log)
    trainer = trainer_class(model=model, args=args, train_dataset=Dataset.from_list([{"input_ids": [1, 3]}]))
    examples = encode_examples(tokenizer, rows, cfg.ptx_max_length)
    assert trainer_class.ptx_examples == examples and examples[1] == ([4, 5, 2], [4, 5, 2])  # EOS appended
    ids = torch.tensor([[1, 3, 4, 5], [1, 6, 6, 7]])
    inputs = {"input_ids": ids, "labels": ids.clone()}

    def expected(micro: int, accumulation: int, own: torch.Tensor) -> tuple[torch.Tensor, float]:
        chosen = ptx_rows(len(rows), 2, 0, accumulation, micro, 0, 1, cfg.seed)
        batch = collate([examples[i] for i in chosen], tokenizer.pad_token_id)
        term = ptx_loss_sum(model, batch) / batch.tokens
        return own + cfg.ptx_coef * term / (accumulation if accumulation > 1 else 1), term.item()

    model.train()
    trainer.current_gradient_accumulation_steps = 1  # what the training loop sets
    mixed = trainer.compute_loss(model, dict(inputs))  # no num_items_in_batch: the Trainer does not rescale
    want, term = expected(0, 1, Trainer.compute_loss(trainer, model, dict(inputs)))
    torch.testing.assert_close(mixed, want)
    assert log == [pytest.approx(term)] and term > 0

    # The next micro-batch of the same step, accumulating two: the next rows, the term halved as the loss is
    trainer.current_gradient_accumulation_steps = 2
    items = torch.tensor(6)
    mixed = trainer.compute_loss(model, dict(inputs), num_items_in_batch=items)
    own = Trainer.compute_loss(trainer, model, dict(inputs), num_items_in_batch=items)
    want, term = expected(1, 2, own)
    torch.testing.assert_close(mixed, want)
    assert log[-1] == pytest.approx(term)

    model.eval()  # evaluation: the trainer's loss alone
    torch.testing.assert_close(
        trainer.compute_loss(model, dict(inputs)), Trainer.compute_loss(trainer, model, dict(inputs))
    )
    assert len(log) == 2
