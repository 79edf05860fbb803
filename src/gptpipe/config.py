"""Recipe schema: the per-stage config classes and the settings groups they share.

A recipe names its ``stage:``; its other keys are the fields of that stage's config dataclass. Stages
that train with a Hugging Face trainer extend that trainer's config class (``PretrainConfig`` extends
``transformers.TrainingArguments``) instead of re-declaring its fields, and add grouped settings for
the model (``model:``) and the data (``datasets:``, ``eval_datasets:``). Reading, overriding, checking
and saving recipes is ``gptpipe.recipe``.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import trl
from transformers import TrainingArguments

# Config fields that may hold credentials: never written to config.yaml (tokens belong in the environment).
SECRET_FIELDS = {"hub_token"}


@dataclass
class LoraSettings:
    """LoRA adapters (peft): only these small matrices train; the base weights stay frozen."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] | None = None  # fully trained extra modules, e.g. [score] for a reward head


@dataclass
class QuantizationSettings:
    """Load the base model in 4 or 8 bits with bitsandbytes (QLoRA when combined with LoRA)."""

    bits: int = 4  # 4 | 8
    quant_type: str = "nf4"  # 4-bit: nf4 | fp4
    double_quant: bool = True  # 4-bit: quantize the quantization constants too (saves ~0.4 bit/parameter)
    compute_dtype: str = "bfloat16"  # dtype of the matmuls on dequantized weights
    quant_storage: str | None = None  # 4-bit storage dtype; set to the model dtype for FSDP (e.g. bfloat16)


@dataclass
class ModelConfig:
    """Which model to train: a Hugging Face id or local path, or a new Llama built from the sizes below."""

    name_or_path: str | None = None  # HF Hub id or local folder; None builds a new model from the sizes below
    tokenizer: str | None = None  # tokenizer id or folder; defaults to name_or_path
    revision: str | None = None
    dtype: str = (
        "auto"  # auto | float32 | bfloat16 | float16 (auto: the checkpoint's dtype; float32 from scratch)
    )
    attn_implementation: str | None = None  # sdpa | eager | flash_attention_2; None lets transformers pick
    trust_remote_code: bool = False
    # From-scratch Llama sizes (used only when name_or_path is None); the vocabulary comes from the tokenizer.
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (no grouped-query attention)
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True  # tiny models spend most parameters on embeddings: share them
    # Memory switches.
    lora: LoraSettings | None = None  # e.g. lora: {r: 16, alpha: 32}
    quantization: QuantizationSettings | None = None  # e.g. quantization: {bits: 4}
    merge_lora: bool = (
        False  # save final/ as a plain model with the adapter merged in (else final/ is the adapter)
    )


@dataclass
class DataSource:
    """One dataset in a mixture: a local file or folder, a Hub dataset id, or ``tinyworld:<part>``."""

    path: str
    name: str | None = None  # Hub dataset config name
    split: str = "train"
    revision: str | None = None
    data_files: str | list[str] | None = None  # for Hub repos / folders with several files
    columns: dict[str, str] = field(
        default_factory=dict
    )  # our field -> the source's column, e.g. {text: content}
    weight: float = 1.0  # sampling multiplier in a mixture: 2.0 repeats the source twice, 0.5 takes half
    max_samples: int | None = None  # keep only the first N rows (quick experiments)
    sample_by: str = "line"  # .txt files: one row per line | paragraph | document
    format: str | None = None  # data format; stages that accept several formats read it (pretraining: text)


@dataclass
class DataSettings:
    """Training and held-out data shared by every stage."""

    datasets: list[DataSource] = field(default_factory=list)
    eval_datasets: list[DataSource] = field(default_factory=list)
    eval_split_size: float = 0.0  # with no eval_datasets: fraction of the training mixture held out
    dataset_num_proc: int | None = None  # processes for tokenization (datasets.map num_proc)


@dataclass
class RunSettings(DataSettings):
    """Settings every trainer-based stage adds to its Hugging Face config class."""

    model: ModelConfig = field(default_factory=ModelConfig)
    resume: bool = True  # continue from the newest checkpoint in output_dir; false starts over
    overwrite: bool = False  # replace a finished run in output_dir (otherwise refused)
    callbacks: list[str] = field(
        default_factory=list
    )  # extra transformers.TrainerCallback classes, "module:Class"
    # A NaN/inf gradient: stop (naming the step and the last good checkpoint) or skip that update (counted in
    # eval.json; not under DeepSpeed, which applies updates inside backward). docs/fault-tolerance.md
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = 20  # with on_nonfinite: skip, stop anyway after this many skipped updates
    slurm_requeue: bool = True  # on SIGUSR1 under Slurm: save a checkpoint, then `scontrol requeue` the job
    # pretrain and sft: where prepared (tokenized, packed) data is kept; None: $GPTPIPE_CACHE/prepared
    prepared_data_dir: str | None = None

    def to_dict(self) -> dict:
        """What HF integrations log (TensorBoard, wandb): the trainer's dict with our nested settings as plain
        data, so ``to_json_string`` works."""
        return {k: plain(v) for k, v in super().to_dict().items()}


@dataclass
class TokenizerConfig(DataSettings):
    """Train a byte-level BPE tokenizer with chat special tokens and a chat template."""

    stage: ClassVar[str] = "tokenizer"
    module: ClassVar[str] = "gptpipe.stages.tokenizer"  # where the stage's main(cfg) lives
    output_dir: str | None = None
    vocab_size: int = 4096  # an upper bound: BPE stops early when no pair reaches min_frequency
    min_frequency: int = 2
    max_train_documents: int | None = None  # cap on documents read for training (large corpora)
    seed: int = 42
    overwrite: bool = False


@dataclass
class PretrainConfig(RunSettings, TrainingArguments):
    """Causal-LM pretraining with ``transformers.Trainer`` on EOS-delimited documents packed into blocks."""

    stage: ClassVar[str] = "pretrain"
    module: ClassVar[str] = "gptpipe.stages.pretrain"
    block_size: int = 256  # tokens per training sequence; documents are concatenated and cut into blocks
    probe_datasets: list[DataSource] = field(
        default_factory=list
    )  # cloze rows {prompt, answer} checked before/after


@dataclass
class SFTConfig(RunSettings, trl.SFTConfig):
    """Supervised finetuning with ``trl.SFTTrainer`` on conversations (see ``gptpipe.data.formats``).

    Loss masks are TRL's switches: ``assistant_only_loss`` (our default: train on what the assistant
    wrote), ``completion_only_loss`` (the final assistant turn only), or both false (every token).
    """

    stage: ClassVar[str] = "sft"
    module: ClassVar[str] = "gptpipe.stages.sft"
    assistant_only_loss: bool = True
    chat_template: str | None = None  # None: the tokenizer's own; or chatml | gptpipe | a .jinja file
    answer_datasets: list[DataSource] = field(default_factory=list)  # held-out chats with an `answer` field
    answer_max_new_tokens: int = 48
    # true: TRL's fused LM head (per-token log-probs in chunks, never the full logits: saves memory with large
    # vocabularies, costs time with small ones); false: the model's own loss on full logits; None: fused for
    # vocabularies of 32k tokens or more, except under DeepSpeed ZeRO-3, whose sharded LM head it cannot read.
    fused_lm_head: bool | None = None


@dataclass
class RewardConfig(RunSettings, trl.RewardConfig):
    """Reward modeling with ``trl.RewardTrainer``: a one-output sequence classifier trained on comparisons."""

    stage: ClassVar[str] = "reward"
    module: ClassVar[str] = "gptpipe.stages.reward"
    chat_template: str | None = None  # None: the tokenizer's own; or chatml | gptpipe | a .jinja file
    truncation_side: Literal["left", "right"] = (
        "left"  # over max_length, cut the start (left) and keep the replies being judged
    )
    invalid_pairs: Literal["error", "drop"] = (
        "error"  # on identical chosen/rejected, missing reply, empty prompt
    )
    check_reload: bool = (
        True  # reload final/ after saving and check it scores exactly as the trained model did
    )


@dataclass
class RLSettings(RunSettings):
    """What every RL algorithm's recipe adds: the frozen reward model, the template and the evidence size."""

    algorithm: str = "ppo"  # ppo (gptpipe's own trainer) | grpo | rloo (TRL's trainers)
    reward_model: str | None = None  # the reward stage's final/ (or any one-output sequence classifier)
    # Python reward functions with TRL's signature (gptpipe.rewards): "module:function" or "file.py:function";
    # with a reward_model too, rewards add up (weights: reward_weights, the reward model first)
    reward_funcs: list[str] = field(default_factory=list)
    reward_quantization: QuantizationSettings | None = None  # frozen reward model in 8 or 4 bits: {bits: 8}
    chat_template: str | None = None
    eval_prompts: int = 128  # held-out prompts scored before and after (greedy)


# The TrainingArguments keys gptpipe's PPO trainer reads (gptpipe.stages.rl, gptpipe.ppo, and the runner's
# distributed set-up). A PPO recipe that sets any other one to a value of its own is refused by validate and
# train (gptpipe.recipe): accepted and ignored, it would change nothing and say nothing.
PPO_TRAINING_KEYS = frozenset(
    """output_dir seed max_steps per_device_train_batch_size gradient_accumulation_steps
    learning_rate lr_scheduler_type lr_scheduler_kwargs warmup_steps
    optim weight_decay adam_beta1 adam_beta2 adam_epsilon max_grad_norm
    logging_steps save_steps save_total_limit report_to resume_from_checkpoint
    use_cpu deepspeed bf16 fp16 ddp_timeout accelerator_config eval_steps""".split()
)


@dataclass
class RLConfig(RLSettings, TrainingArguments):
    """RLHF against a frozen reward model. ``algorithm: ppo`` is gptpipe's own trainer (``gptpipe.ppo``);
    it reads the familiar ``TrainingArguments`` keys (learning_rate, max_steps, per_device_train_batch_size as
    prompts per iteration and process, gradient_accumulation_steps, logging_steps, save_steps, seed) plus
    the PPO settings below."""

    stage: ClassVar[str] = "rl"
    module: ClassVar[str] = "gptpipe.stages.rl"
    # Stepped once per PPO iteration. Constant by default, as gptpipe's PPO always ran (TRL's PPOTrainer and
    # the Trainer default to linear decay: lr_scheduler_type: linear).
    lr_scheduler_type: str = "constant"
    training_keys_read: ClassVar[frozenset[str]] = PPO_TRAINING_KEYS  # the others are refused when set
    trainer: ClassVar[str] = "gptpipe's PPO trainer (algorithm: ppo)"
    unread_hint: ClassVar[str] = "TRL's trainers (algorithm: grpo or rloo) read every key."
    value_init: Literal["reward", "policy"] = (
        "reward"  # critic from the reward model (InstructGPT) or from the policy (zero head)
    )
    value_learning_rate: float | None = None  # None: learning_rate
    value_lora: LoraSettings | None = None  # train the critic as LoRA adapters (its score head in full)
    reward_clip: float | None = None  # clip reward-model scores to [-c, c] before the KL penalty
    # Scale each batch's per-token rewards to unit variance, keeping their mean (the 2019 code, TRL's PPO)
    whiten_rewards: bool = False
    max_new_tokens: int = 32
    temperature: float = 1.0  # sampling temperature; log-probs use the same one
    top_p: float = 1.0
    ppo_epochs: int = 4
    num_minibatches: int = 1
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    # The value loss's weight (TRL's PPO: 0.1). Policy and critic gradients are clipped to max_grad_norm together
    # (DeepSpeed clips its one engine so; the DDP path does the same)
    vf_coef: float = 0.1
    gamma: float = 1.0  # RLHF practice: no discount within a response
    lam: float = 0.95
    kl_coef: float = 0.05  # β: the per-token KL penalty against the reference (the SFT model)
    kl_estimator: Literal["k1", "k3"] = "k1"  # k1: log-ratio; k3: (r - 1) - log r, never negative
    kl_target: float | None = None  # set: adaptive β (Ziegler et al.) steering the per-sample KL to this
    kl_horizon: int = 10000
    reward_weights: list[float] | None = None  # one per reward (reward model first); None: all 1.0 (as TRL)
    # Rows per no-grad forward pass when a rollout is scored (old and reference log-probs, values): the whole
    # batch's [rows x length x vocabulary] float logits at once can outgrow the model. None: all at once
    forward_batch_size: int | None = None
    # A response that never stops: its score becomes missing_eos_score (e.g. -1.0), or its score minus
    # missing_eos_penalty (TRL's key, e.g. 1.0)
    missing_eos_score: float | None = None
    missing_eos_penalty: float | None = None
    # The reward-hacking alarm (gptpipe.hacking): every eval_steps iterations, reward, KL and answer accuracy on the
    # first watch_prompts held-out prompts, logged as eval/*; the reward rising over hacking_window evaluations
    # while accuracy falls is a warning and a `reward_hacking` record, and stops the run when asked
    watch_prompts: int = 32
    hacking_window: int = 3
    stop_on_reward_hacking: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ValueError(  # build_dataclass reports it with the file
                f"missing_eos_penalty: {self.missing_eos_penalty} is subtracted from the score of a response that "
                "never stops (as in TRL), so a negative one rewards it; give a positive penalty, or set "
                f"missing_eos_score: {self.missing_eos_penalty} to give such responses that score"
            )


@dataclass
class GRPOConfig(RLSettings, trl.GRPOConfig):
    """GRPO with ``trl.GRPOTrainer``: groups of ``num_generations`` samples per prompt, each scored by the
    reward model and compared with its group's mean (no critic). Every ``trl.GRPOConfig`` key applies
    (``beta`` is the KL coefficient, ``max_completion_length`` the response length)."""

    stage: ClassVar[str] = "rl"
    module: ClassVar[str] = "gptpipe.stages.rl_trl"
    algorithm: str = "grpo"


@dataclass
class RLOOConfig(RLSettings, trl.RLOOConfig):
    """RLOO with ``trl.RLOOTrainer``: REINFORCE with the other samples of the same prompt as the baseline.
    Every ``trl.RLOOConfig`` key applies."""

    stage: ClassVar[str] = "rl"
    module: ClassVar[str] = "gptpipe.stages.rl_trl"
    algorithm: str = "rloo"


@dataclass
class RankConfig(DataSettings):
    """On-policy comparisons: the model's own samples for each prompt (``datasets``), ranked by a labeler or
    by human rankings into ``final/comparisons.jsonl`` (``ranked`` format) for the reward stage."""

    stage: ClassVar[str] = "rank"
    module: ClassVar[str] = "gptpipe.stages.rank"
    output_dir: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)  # the SFT model whose samples are compared
    num_samples: int = 4  # samples per prompt
    max_prompts: int | None = None  # the first N prompts (None: all)
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 32
    labeler: str | None = None  # "module:function", e.g. gptpipe.data.tinyworld:label
    rankings: str | None = (
        None  # or a jsonl file of human rankings: {id, ranking: [sample numbers, best first]}
    )
    seed: int = 42
    overwrite: bool = False


STAGE_CONFIGS: dict[str, type] = {
    "tokenizer": TokenizerConfig,
    "pretrain": PretrainConfig,
    "sft": SFTConfig,
    "rank": RankConfig,
    "reward": RewardConfig,
    "rl": RLConfig,
}
# `stage: rl` recipes pick their class by `algorithm:`.
RL_CONFIGS: dict[str, type] = {"ppo": RLConfig, "grpo": GRPOConfig, "rloo": RLOOConfig}


def plain(obj: Any) -> Any:
    """A config (nested dataclasses, enums, paths) as plain YAML/JSON-able data, secrets left out."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = [f for f in dataclasses.fields(obj) if f.init and f.name not in SECRET_FIELDS]
        return {f.name: plain(getattr(obj, f.name)) for f in fields}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
