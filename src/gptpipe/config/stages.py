"""The per-stage config classes: a recipe names its ``stage:``, its other keys are the fields of that stage's
class. Stages that train with a Hugging Face trainer extend that trainer's config class (``SFTConfig`` extends
``trl.SFTConfig``) instead of re-declaring its fields, and add the shared groups of
``gptpipe.config.settings``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import trl
from transformers import TrainingArguments

from gptpipe.config.settings import (
    DataSettings,
    DataSource,
    LoraSettings,
    ModelConfig,
    QuantizationSettings,
    RunSettings,
)


@dataclass
class TokenizerConfig(DataSettings):
    """Train a byte-level BPE tokenizer with chat special tokens and a chat template."""

    stage: ClassVar[str] = "tokenizer"
    module: ClassVar[str] = "gptpipe.stages.tokenizer"  # where the stage's main(cfg) lives
    output_dir: str | None = None
    vocab_size: int = 4096  # an upper bound: BPE stops early when no pair reaches min_frequency
    min_frequency: int = 2
    max_train_documents: int | None = None  # cap on documents read for training (large corpora)
    # every digit its own token (as Llama's and Qwen's tokenizers), a space kept on the first: numbers copy alike
    split_digits: bool = False
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
class ToolSettings:
    """Tools the model may call (``gptpipe.tools``) and the evidence of its tool use (``gptpipe.tool_use``):
    ``tools`` as ``module:function`` or ``path/to/file.py:function`` (typed, with a docstring: transformers
    builds the schema the model sees from them); ``tool_datasets``: held-out questions (``messages``,
    ``answer``; in the tiny recipes ``tinyworld:tools`` split eval) answered with the tools offered and run
    and with none, before and after, as ``tool_answer_accuracy``, ``no_tool_answer_accuracy``,
    ``tool_call_validity`` and ``tool_calls_per_answer``."""

    tools: list[str] = field(default_factory=list)
    tool_datasets: list[DataSource] = field(default_factory=list)
    tool_timeout: float = 5.0  # seconds a tool call may run before it is cut off (its result: an error text)
    max_tool_calls: int = 3  # rounds of calls in one answer; one more round is answered with no answer
    tool_eval_max_new_tokens: int = 64  # tokens of each turn in the evidence (a call and its JSON fit in 64)

    def __post_init__(self):
        super().__post_init__()
        if self.tool_datasets and not self.tools:
            raise ValueError(  # build_dataclass reports it with the file
                "tool_datasets: the held-out tool questions need the tools to answer them: name them in tools: "
                "(the tiny world's calculator: [gptpipe.data.arithmetic:add, gptpipe.data.arithmetic:multiply])"
            )
        if self.tool_timeout <= 0 or self.max_tool_calls < 1:
            raise ValueError(
                f"tool_timeout: {self.tool_timeout}, max_tool_calls: {self.max_tool_calls}: both must be positive "
                "(seconds a call may run; rounds of calls in one answer)"
            )


@dataclass
class PTXSettings:
    """InstructGPT's ptx term (eq. 2) for RL (every algorithm: PPO-ptx) and SFT (``gptpipe.ptx_term``)."""

    # In every update, ptx_coef x the language-model loss
    # (token mean) on a batch of ptx_datasets rows: conversations (format messages, alpaca, sharegpt...; the loss
    # on the final assistant turn, as SFT) or `text` documents (every token, as pretraining). It keeps what SFT
    # taught while RL or a second SFT trains on new prompts (the alignment tax). 0: no ptx term
    ptx_coef: float = 0.0
    ptx_datasets: list[DataSource] = field(default_factory=list)
    # rows per update and process; None: PPO's minibatch rows, GRPO's/RLOO's prompts per micro-batch, SFT's rows
    ptx_batch_size: int | None = None
    ptx_max_length: int = 256  # tokens per ptx row (longer rows are cut at the end)

    def __post_init__(self):
        super().__post_init__()
        if self.ptx_coef < 0 or (self.ptx_coef > 0) != bool(self.ptx_datasets):
            raise ValueError(  # build_dataclass reports it with the file
                f"ptx_coef: {self.ptx_coef} with {len(self.ptx_datasets)} ptx_datasets: the ptx term needs both, a "
                "positive ptx_coef (the tiny recipes: 1.0) and the data to keep (ptx_datasets: "
                "[{path: tinyworld:sft}]); leave both out for no ptx term"
            )


@dataclass
class SFTConfig(ToolSettings, PTXSettings, RunSettings, trl.SFTConfig):
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
    # The new skill asked in a phrasing no training data has (chats with an `answer` field), answered greedily
    # before and after as generalization_answer_accuracy; with tools, with the tools offered and run
    generalization_datasets: list[DataSource] = field(default_factory=list)
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
class AssistantEvidence(RunSettings):
    """What every stage after SFT measures besides the skill it trains (its held-out prompts): the whole
    assistant. ``generalization_datasets``: the skill asked in a phrasing no training data has;
    ``retained_datasets``: what the starting model could already do and must keep (in the tiny recipes, SFT's
    held-out questions). Each is answered greedily before and after, as ``generalization_*`` and ``retained_*``
    (answer accuracy with an ``answer`` column, reward, KL); the report card's verdict names an alignment tax
    when the retained accuracy falls by more than 0.03."""

    eval_prompts: int = 128  # prompts of each held-out set answered before and after (greedy)
    generalization_datasets: list[DataSource] = field(default_factory=list)
    retained_datasets: list[DataSource] = field(default_factory=list)


@dataclass
class RLSettings(ToolSettings, PTXSettings, AssistantEvidence):
    """What every RL algorithm's recipe adds: the frozen reward model, the template and the evidence size."""

    algorithm: str = "ppo"  # ppo (gptpipe's own trainer) | grpo | rloo (TRL's trainers)
    reward_model: str | None = None  # the reward stage's final/ (or any one-output sequence classifier)
    # Python reward functions with TRL's signature (gptpipe.rewards): "module:function" or "file.py:function";
    # with a reward_model too, rewards add up (weights: reward_weights, the reward model first)
    reward_funcs: list[str] = field(default_factory=list)
    reward_quantization: QuantizationSettings | None = None  # frozen reward model in 8 or 4 bits: {bits: 8}
    chat_template: str | None = None
    # The reward-hacking alarm (gptpipe.hacking): every eval_steps steps, reward, KL, answer accuracy and the
    # reward model's agreement with the answer check on the first watch_prompts held-out prompts, logged as
    # eval/*; the reward rising over hacking_window evaluations while accuracy or agreement falls is a warning
    # and a `reward_hacking` record, and stops the run when asked. keep_best_model: the policy of the most
    # accurate evaluation in <output_dir>/best/
    watch_prompts: int = 32
    hacking_window: int = 3
    stop_on_reward_hacking: bool = False
    keep_best_model: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.tools and self.algorithm == "rloo":
            raise ValueError(
                "tools: TRL's RLOOTrainer takes no tools; use algorithm: grpo (TRL's tool loop) or ppo (gptpipe's)"
            )


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
class PreferenceSettings(AssistantEvidence):
    """What the preference stages (DPO, KTO) add to TRL's config: the comparisons' template and checks, and the
    RL stages' answer-accuracy evidence. The reference is the starting model (with ``model.lora``, the same
    weights with the adapter disabled: no second copy)."""

    chat_template: str | None = None  # None: the tokenizer's own; or chatml | gptpipe | a .jinja file
    invalid_pairs: Literal["error", "drop"] = (
        "error"  # on identical chosen/rejected, missing reply, empty prompt
    )
    # Held-out prompts with an `answer` (e.g. tinyworld:rl_prompts): answer accuracy and KL to the reference of
    # greedy replies, before and after, measured as the RL stages measure them (gptpipe.rlhf)
    prompt_datasets: list[DataSource] = field(default_factory=list)
    max_new_tokens: int = 32


@dataclass
class DPOConfig(PreferenceSettings, trl.DPOConfig):
    """Direct preference optimization with ``trl.DPOTrainer`` on the comparisons the reward stage reads (every
    ``trl.DPOConfig`` key applies: ``beta``, ``loss_type``, ``precompute_ref_log_probs``...)."""

    stage: ClassVar[str] = "dpo"
    module: ClassVar[str] = "gptpipe.stages.dpo"


@dataclass
class KTOConfig(PreferenceSettings, trl.KTOConfig):
    """KTO with ``trl.KTOTrainer``: unpaired replies labeled desirable or not (``unpaired`` rows, or comparisons
    split into both); every ``trl.KTOConfig`` key applies (``beta``, ``desirable_weight``...)."""

    stage: ClassVar[str] = "kto"
    module: ClassVar[str] = "gptpipe.stages.kto"


@dataclass
class DistillConfig(AssistantEvidence, trl.DistillationConfig):
    """On-policy distillation with ``trl.DistillationTrainer``: the student (``model``) samples replies to the
    prompts and learns the teacher's next-token distribution at every token of them (generalized JSD: ``beta``
    0 forward KL, 1 reverse KL). The teacher (``teacher_model_name_or_path``: any model folder or Hub id) must
    share the student's vocabulary. Every ``trl.DistillationConfig`` key applies."""

    stage: ClassVar[str] = "distill"
    module: ClassVar[str] = "gptpipe.stages.distill"
    chat_template: str | None = None  # None: the tokenizer's own; or chatml | gptpipe | a .jinja file


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
    # "module:function" or "path/to/file.py:function", e.g. gptpipe.data.tinyworld:label
    labeler: str | None = None
    # Rejection sampling: each prompt's best sample (with a labeler, when its score is at least min_score) as an
    # SFT conversation in final/best.jsonl (format messages), for an SFT stage after this one
    min_score: float | None = None
    # A prompt column holding a written reply (a demonstration, e.g. tinyworld:rl_prompts' reference), ranked
    # beside the samples as one more candidate (sample number num_samples), on the training prompts only: the
    # reward model then sees the reply the policy should write against those it does write (SPIN's pairs);
    # other_references: N other prompts' written replies ranked beside them too (answers to another question)
    reference_column: str | None = None
    other_references: int = 0
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
    "dpo": DPOConfig,
    "kto": KTOConfig,
    "distill": DistillConfig,
}
# `stage: rl` recipes pick their class by `algorithm:`.
RL_CONFIGS: dict[str, type] = {"ppo": RLConfig, "grpo": GRPOConfig, "rloo": RLOOConfig}
