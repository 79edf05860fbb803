"""InstructGPT's ptx term (Ouyang et al. 2022, eq. 2) for the stages that train with a TRL or transformers
trainer: GRPO and RLOO (PPO-ptx) and SFT (the same term while SFT teaches a new skill, tool calls in the tiny
recipes, so that it keeps what pretraining and the first SFT taught). Each training micro-batch's loss gets
``ptx_coef`` times the language-model loss on a batch of ``ptx_datasets`` rows. gptpipe's own PPO takes the same
term in its update (``gptpipe.ppo.trainer.mix_in``); the row choice and the loss are ``gptpipe.ppo.ptx``'s.
"""

from __future__ import annotations

from transformers import TrainerCallback

from gptpipe.data import formats
from gptpipe.data.sources import describe, load_mixture
from gptpipe.errors import UserError
from gptpipe.ppo.ptx import collate, encode_examples, ptx_loss_sum, ptx_rows


def ptx_data(cfg):
    """The ptx term's rows (``ptx_datasets``): conversations in any format SFT reads (``format:``, ``messages`` when
    the rows have no ``text`` column) or ``text`` documents, one kind per run."""

    kinds: set[bool] = set()  # text documents or conversations: one schema per mixture

    def prepare(ds, src):
        fmt = src.format or ("text" if "text" in ds.column_names else "messages")
        kinds.add(fmt == "text")
        if len(kinds) > 1:
            raise UserError(
                f"ptx_datasets: {describe(src)}: mix either text documents or conversations, not both in one run"
            )
        return formats.convert(ds, fmt, f"ptx_datasets: {describe(src)}", cfg.dataset_num_proc)

    return load_mixture(cfg.ptx_datasets, [], seed=cfg.seed, prepare=prepare)


def with_ptx(trainer_class, cfg, tokenizer, ptx, size: int, log: list):
    """A TRL or transformers trainer with InstructGPT's ptx term (``gptpipe.ppo.ptx``): each micro-batch's loss plus ``ptx_coef``
    times the language-model loss on ``size`` ptx rows chosen by the step and micro-batch (exact resume), scaled for
    gradient accumulation as the trainer scales its own loss. TRL has no such term; ``compute_loss`` is the
    Trainer's documented hook for a loss of one's own."""
    examples = encode_examples(tokenizer, list(ptx), cfg.ptx_max_length)

    class WithPTX(trainer_class):
        ptx_examples = examples

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not model.training:
                return loss
            step, accumulation = self.state.global_step, self.current_gradient_accumulation_steps
            micro = self.ptx_micro + 1 if getattr(self, "ptx_step", None) == step else 0
            self.ptx_step, self.ptx_micro = step, micro
            rank, world = self.accelerator.process_index, self.accelerator.num_processes
            rows = ptx_rows(len(examples), size, step, accumulation, micro, rank, world, cfg.seed)
            batch = collate([examples[i] for i in rows], tokenizer.pad_token_id)
            term = ptx_loss_sum(model, batch) / batch.tokens.clamp(min=1)
            log.append(term.item())
            scaled = self.loss_is_scaled_for_ga  # the Trainer divides the loss by the accumulation unless set
            if scaled is None:
                scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
            return loss + cfg.ptx_coef * (term / accumulation if scaled else term)

    return WithPTX


class PTXLog(TrainerCallback):
    """``ptx_loss`` (the mean since the last log) in the trainer's logs, for metrics.jsonl and the trackers."""

    def __init__(self, values: list):
        self.values = values

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.values and logs is not None:
            logs["ptx_loss"] = sum(self.values) / len(self.values)
            self.values.clear()
