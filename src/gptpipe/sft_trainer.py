"""``trl.SFTTrainer`` as the SFT stage runs it: the loss from TRL's fused LM head or the model's own (chosen by
vocabulary size, never under ZeRO-3), and ``nonpad_fraction`` logged (the share of real tokens in the batches)."""

from __future__ import annotations

from transformers import Trainer
from trl import SFTTrainer

from gptpipe.config import SFTConfig
from gptpipe.errors import UserError

# Vocabulary size from which TRL's fused (chunked) LM head is the default. It never materializes the
# [tokens x vocab] logits, which is what fits long sequences of 32k-256k-token vocabularies (Llama 3, Qwen,
# SmolLM2) in GPU memory; below this the logits are small and the chunked backward only costs time
# (bench/sft.py, docs/benchmarks.md: TRL's head made tiny-vocabulary SFT 0.55x a plain HF Trainer).
FUSED_HEAD_MIN_VOCAB = 32_000


def uses_fused_lm_head(cfg: SFTConfig, vocab_size: int) -> bool:
    """Whether to take the loss from TRL's fused LM head: ``fused_lm_head`` when the recipe sets it, else
    for vocabularies of ``FUSED_HEAD_MIN_VOCAB`` tokens or more. Never under DeepSpeed ZeRO-3: the fused head
    reads ``lm_head.weight`` directly, which ZeRO-3 leaves empty outside the module's own forward."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():  # a recipe's deepspeed: or an accelerate ZeRO-3 launch config
        if cfg.fused_lm_head:
            raise UserError(
                "fused_lm_head: true does not work under DeepSpeed ZeRO-3 (the LM head is sharded); "
                "leave it unset or set it to false"
            )
        return False
    if cfg.fused_lm_head is not None:
        return cfg.fused_lm_head
    return vocab_size >= FUSED_HEAD_MIN_VOCAB


class PadCounter:
    """Wraps a collator and counts real (non-pad) tokens against all tokens in the batches it builds."""

    def __init__(self, collate):
        self.collate, self.real, self.total = collate, 0, 0

    def __call__(self, features):
        batch = self.collate(features)
        mask, n = batch.get("attention_mask"), batch["input_ids"].numel()
        self.real += (
            int(mask.sum()) if mask is not None else n
        )  # padding-free batches carry no mask: all real
        self.total += n
        return batch

    def take(self) -> float | None:
        fraction = self.real / self.total if self.total else None
        self.real = self.total = 0
        return fraction


class PadStatsSFTTrainer(SFTTrainer):
    """``SFTTrainer`` that also logs ``nonpad_fraction``: the share of real tokens in the training batches
    since the last log (1.0 with packing or padding-free batches), and can take the loss from the model
    itself (``fused_lm_head: false``; forced under ZeRO-3, see ``uses_fused_lm_head``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_lm_head = uses_fused_lm_head(self.args, self.model.get_output_embeddings().weight.shape[0])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.fused_lm_head:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # transformers.Trainer's loss: the model's own cross-entropy over the collator's labels (-100 off the
        # loss mask), token-weighted across micro-batches and processes through num_items_in_batch.
        inputs["use_cache"] = False
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    def get_train_dataloader(self):
        collate = self.data_collator
        self.pad_counter = PadCounter(collate)
        self.data_collator = self.pad_counter
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collate

    def log(self, logs: dict, start_time: float | None = None) -> None:
        counter = getattr(self, "pad_counter", None)
        if "loss" in logs and counter is not None:
            fraction = counter.take()
            if fraction is not None:
                logs["nonpad_fraction"] = fraction
        super().log(logs, start_time)
