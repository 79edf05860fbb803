"""Model and tokenizer construction: from a Hugging Face id or folder, or a new Llama from a size config."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from gptpipe.config import ModelConfig
from gptpipe.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists() or name.count("/") > 1


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer named by ``model.tokenizer`` (or ``model.name_or_path``), with a pad token set."""
    name = cfg.tokenizer or cfg.name_or_path
    if not name:
        raise UserError(
            "model.tokenizer is required when training from scratch (a tokenizer folder, e.g. "
            "runs/tiny/tokenizer/final from `gptpipe train recipes/tiny/tokenizer.yaml`, or a Hub id)"
        )
    if _looks_local(name) and not Path(name).expanduser().exists():
        raise UserError(f"model.tokenizer: {name} does not exist; train it first or fix the path")
    try:
        tok = AutoTokenizer.from_pretrained(
            name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except OSError as e:
        raise UserError(f"model.tokenizer: could not load {name!r}: {e}") from None
    if tok.pad_token is None:  # many base tokenizers ship without one; batching needs it
        tok.pad_token = tok.eos_token
    return tok


def _dtype(name: str, key: str):
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise UserError(f"{key}: expected one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def model_path(cfg: ModelConfig) -> str:
    """``model.name_or_path``, made absolute when it is a local folder (adapters record their base by path)."""
    name = cfg.name_or_path
    if _looks_local(name):
        if not Path(name).expanduser().exists():
            raise UserError(f"model.name_or_path: {name} does not exist; run the stage that makes it first")
        return str(Path(name).expanduser().resolve())
    return name


def quantization_config(cfg: ModelConfig):
    """A ``BitsAndBytesConfig`` for ``model.quantization``, or None."""
    q = cfg.quantization
    if q is None:
        return None
    if q.bits not in (4, 8):
        raise UserError(f"model.quantization.bits: expected 4 or 8, got {q.bits}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("model.quantization needs bitsandbytes: pip install 'gptpipe[quant]'") from None
    from transformers import BitsAndBytesConfig

    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    storage = _dtype(q.quant_storage, "model.quantization.quant_storage") if q.quant_storage else torch.uint8
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=_dtype(q.compute_dtype, "model.quantization.compute_dtype"),
        bnb_4bit_quant_storage=storage,
    )


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, auto_class=AutoModelForCausalLM):
    """Load ``model.name_or_path`` (quantized if asked), or build a new Llama whose vocabulary is the tokenizer's.

    ``auto_class=AutoModelForSequenceClassification`` loads a one-output reward model. LoRA is applied
    separately (``apply_lora``), so stages can measure the model before wrapping it.
    """
    dtype = _dtype(cfg.dtype, "model.dtype")
    if cfg.name_or_path:
        name = model_path(cfg)
        try:
            model = auto_class.from_pretrained(
                name,
                revision=cfg.revision,
                dtype=dtype,
                attn_implementation=cfg.attn_implementation,
                trust_remote_code=cfg.trust_remote_code,
                quantization_config=quantization_config(cfg),
                **_head_kwargs(auto_class),
            )
        except OSError as e:
            raise UserError(f"model.name_or_path: could not load {cfg.name_or_path!r}: {e}") from None
        if model.config.pad_token_id is None:  # classifiers find each sequence's last token by the pad id
            model.config.pad_token_id = tokenizer.pad_token_id
        return model
    if cfg.quantization is not None:
        raise UserError(
            "model.quantization needs a pretrained model (model.name_or_path): a new model has nothing to quantize"
        )
    if auto_class is not AutoModelForCausalLM:
        raise UserError(
            "model.name_or_path is required: this stage starts from a trained model (e.g. the sft stage's final/)"
        )
    if cfg.hidden_size % cfg.num_attention_heads:
        raise UserError(
            f"model.hidden_size ({cfg.hidden_size}) must be a multiple of model.num_attention_heads ({cfg.num_attention_heads})"
        )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if cfg.attn_implementation:
        config._attn_implementation = cfg.attn_implementation
    model = LlamaForCausalLM(config)
    return model.to(torch.float32 if dtype == "auto" else dtype)


def apply_lora(
    model: torch.nn.Module,
    cfg: ModelConfig,
    task_type: str = "CAUSAL_LM",
    new_token_ids: list[int] | None = None,
) -> torch.nn.Module:
    """Wrap the model with LoRA adapters when ``model.lora`` is set (k-bit models are prepared first).

    ``new_token_ids`` (tokens added for a chat template) get their embedding rows trained too: a frozen
    random embedding for ``<|im_end|>`` would never learn to end a turn.
    """
    if cfg.lora is None:
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        modules_to_save=cfg.lora.modules_to_save,
        trainable_token_indices=list(new_token_ids) if new_token_ids else None,
        task_type=task_type,
    )
    return get_peft_model(model, lora)


def frozen_reference(trainer, cfg, tokenizer):
    """The frozen reference of a TRL trainer's policy (RL's KL, DPO's implicit reward), for the evidence: TRL's
    own copy when it keeps one, None with LoRA (the policy with its adapter disabled is the reference), else the
    starting model loaded once more (TRL keeps none at ``beta: 0`` or with ``precompute_ref_log_probs``)."""
    if cfg.model.lora is not None:
        return None
    if getattr(trainer, "ref_model", None) is not None:
        return trainer.accelerator.unwrap_model(trainer.ref_model)
    reference = build_model(cfg.model, tokenizer).requires_grad_(False).eval()
    return reference.to(trainer.accelerator.device)


def output_size(name: str, revision=None, remote_code=False) -> int:
    """The size of a model's output layer (its config's ``vocab_size``; a LoRA folder's base's), read from its
    config alone."""
    if is_adapter(name):
        name = adapter_base(name)
    config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=remote_code)
    return config.get_text_config().vocab_size


def check_same_vocabulary(key: str, name: str, cfg: ModelConfig, tokenizer, revision=None, remote_code=False):
    """Refuse a model (``key: name``, e.g. a distillation teacher) whose tokenizer or output layer differs from
    the model ``cfg`` (with ``tokenizer``): token-by-token comparisons of the two would be meaningless. Reads
    tokenizers and configs only, before any weights load."""
    if _looks_local(name) and not Path(name).expanduser().exists():
        raise UserError(f"{key}: {name} does not exist; train that model first or fix the path")
    try:
        theirs = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=remote_code)
        their_size = output_size(name, revision, remote_code)
    except OSError as e:
        raise UserError(f"{key}: could not load {name!r}: {e}") from None
    fix = "pick one of the student's model family (the same tokenizer), or train on its replies with the sft stage"
    ours, their_vocab = tokenizer.get_vocab(), theirs.get_vocab()
    if ours != their_vocab:
        token = next((t for t in sorted(ours) if their_vocab.get(t) != ours[t]), None) or next(
            t for t in sorted(their_vocab) if t not in ours
        )
        raise UserError(
            f"{key}: {name} has another tokenizer than the student's ({len(their_vocab)} tokens against "
            f"{len(ours)}; {token!r} is id {ours.get(token)} for the student, {their_vocab.get(token)} for it): the "
            f"two models' next-token distributions are compared id by id; {fix}"
        )
    our_size = (
        output_size(model_path(cfg), cfg.revision, cfg.trust_remote_code)
        if cfg.name_or_path
        else len(tokenizer)
    )
    if their_size != our_size:
        raise UserError(
            f"{key}: {name} has an output layer of {their_size} tokens, the student {our_size} (the same "
            f"tokenizer, padded differently): the two distributions must have one size; {fix}"
        )


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(path: str | Path) -> str:
    """The base model a LoRA adapter folder was trained on (its ``base_model_name_or_path``)."""
    from peft import PeftConfig

    return PeftConfig.from_pretrained(str(path)).base_model_name_or_path


def _head_kwargs(auto_class) -> dict:
    """A reward model is a sequence classifier with one output: say so whenever one is loaded."""
    return {"num_labels": 1} if auto_class is AutoModelForSequenceClassification else {}


def merge_adapter(adapter_dir: str | Path, auto_class=AutoModelForCausalLM) -> Path:
    """Replace a saved adapter folder by a plain model with the adapter merged in; returns the new folder.

    The base is loaded in full precision (never merge into quantized weights); the adapter folder's
    tokenizer and generation config go along.
    """
    adapter_dir = Path(adapter_dir)
    out = merged_copy(adapter_dir, adapter_dir.with_name(adapter_dir.name + ".merged"), auto_class)
    shutil.rmtree(adapter_dir)
    return out


def merged_copy(adapter_dir: str | Path, out: str | Path, auto_class=AutoModelForCausalLM) -> Path:
    """Write ``adapter_dir`` with its adapter merged into its base as a plain model folder ``out`` (the
    adapter folder stays), with its tokenizer and generation config; returns ``out``."""
    from peft import PeftModel

    adapter_dir, out = Path(adapter_dir), Path(out)
    base_name = adapter_base(adapter_dir)
    base = auto_class.from_pretrained(base_name, dtype=torch.float32, **_head_kwargs(auto_class))
    PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out)
    if (adapter_dir / "generation_config.json").is_file():
        shutil.copy(adapter_dir / "generation_config.json", out / "generation_config.json")
    return out


def load_for_inference(path: str | Path, auto_class=AutoModelForCausalLM, quantization=None):
    """(model, tokenizer) from a run's ``final/`` folder: a full model or a LoRA adapter.

    ``quantization`` (a ``QuantizationSettings``) loads the weights in 4 or 8 bits, e.g. a frozen reward model.
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(
            f"{path}: no such model folder (expected a run's final/ folder or a downloaded model)"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    load_kwargs = {}
    if quantization is not None:
        load_kwargs["quantization_config"] = quantization_config(ModelConfig(quantization=quantization))
    if is_adapter(path):
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

        peft_class = (
            AutoPeftModelForCausalLM
            if auto_class is AutoModelForCausalLM
            else AutoPeftModelForSequenceClassification
        )
        model = peft_class.from_pretrained(str(path), **_head_kwargs(auto_class), **load_kwargs)
        if (path / "generation_config.json").is_file():  # the end-of-turn stop the SFT stage chose
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(path)
    else:
        model = auto_class.from_pretrained(path, **load_kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:  # classifiers find each sequence's last token by the pad id
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def quantized_layers(model: torch.nn.Module) -> int:
    """How many linear layers hold 4- or 8-bit bitsandbytes weights (0 for a full-precision model)."""
    return sum(type(m).__module__.startswith("bitsandbytes") for m in model.modules())  # not peft's wrappers


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (whole tensors, also when ZeRO-3 holds a shard of each)."""

    def numel(p) -> int:
        return getattr(p, "ds_numel", None) or p.numel()

    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, total
