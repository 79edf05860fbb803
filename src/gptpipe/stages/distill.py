"""Distillation stage: on-policy distillation with ``trl.DistillationTrainer`` (Agarwal et al. 2024, GKD): the
student replies to each training prompt with its own samples and learns, at every token of them, the teacher's
next-token distribution (generalized Jensen-Shannon divergence: ``beta`` 0 forward KL, 1 reverse KL).

    gptpipe train recipes/tiny/distill.yaml
    accelerate launch --config_file accelerate_configs/zero2.yaml -m gptpipe train recipes/qwen2.5/distill.yaml

The student is ``model`` (LoRA / 4-8-bit as in SFT), the teacher ``teacher_model_name_or_path`` (any model
folder or Hub id, loaded by TRL): the two must share one tokenizer, checked before any weights load. Prompts are
``datasets`` (``prompt`` rows as the RL stages read them); held out, ``eval_datasets``. The recipe is a
``trl.DistillationConfig`` (``beta``, ``temperature``, ``max_completion_length``...). Interrupted runs resume
from the newest checkpoint.

Evidence (``eval.json``), before and after, on the held-out prompts, measured as the RL stages measure them
(``gptpipe.rlhf.evaluate``): the student's answer accuracy (prompts with an ``answer``) next to the teacher's,
and the KL from the student's greedy replies to the teacher.
"""

from __future__ import annotations

from transformers import set_seed
from trl import DistillationTrainer

from gptpipe.config import DistillConfig
from gptpipe.data import chat_templates
from gptpipe.data.sources import load_train_eval
from gptpipe.errors import UserError
from gptpipe.modeling import check_same_vocabulary, count_parameters, load_tokenizer
from gptpipe.preference import publish, starting_policy, train_measured
from gptpipe.rlhf import evaluate, prompt_rows, whole_assistant_line
from gptpipe.runs import Run
from gptpipe.tracking import MetricsLogger, load_callbacks

TEACHER = "teacher_model_name_or_path"


def main(cfg: DistillConfig, run: Run) -> dict:
    if not cfg.teacher_model_name_or_path:
        raise UserError(
            f"{TEACHER}: distillation needs a teacher (a model folder, e.g. runs/tiny/sft/final, or a Hub id) "
            "that shares the student's tokenizer"
        )
    tokenizer = load_tokenizer(cfg.model)
    chat_templates.install(tokenizer, cfg.chat_template, False, cfg.model.tokenizer or cfg.model.name_or_path)
    with cfg.main_process_first(desc="reading prompts"):
        train, heldout = load_train_eval(cfg, [], seed=cfg.seed, prepare=prompt_rows)
    if heldout is None:
        raise UserError(
            "eval_datasets: distillation needs held-out prompts for its evidence (or set eval_split_size)"
        )
    heldout = heldout.select(range(min(cfg.eval_prompts, len(heldout))))

    teacher_name = cfg.teacher_model_name_or_path
    check_same_vocabulary(
        TEACHER, teacher_name, cfg.model, tokenizer, cfg.teacher_model_revision, cfg.trust_remote_code
    )

    set_seed(cfg.seed)
    student = starting_policy(cfg, tokenizer)
    trainable, total = count_parameters(student)
    run.say(
        f"[distill] {trainable / 1e6:.2f}M of {total / 1e6:.2f}M student parameters train; {len(train)} prompts, "
        f"teacher {teacher_name}"
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher_name,
        args=cfg,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[MetricsLogger(run.output_dir), *load_callbacks(cfg.callbacks)],
    )
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    length = cfg.max_completion_length
    taught = evaluate(teacher, teacher, tokenizer, heldout, None, length)  # every process (ZeRO-3 forwards)
    evidence, student = train_measured(
        run, trainer, cfg, tokenizer, heldout, lambda m, ref: {}, teacher=teacher, max_new_tokens=length
    )
    evidence |= {f"teacher_{k}": v for k, v in taught.items() if k != "kl"}
    evidence |= {
        "train_prompts": len(train),
        "heldout_prompts": len(heldout),
        "parameters": total,
        "trainable_parameters": trainable,
        "teacher_parameters": count_parameters(teacher)[1],
        "seconds": run.seconds(),
    }
    publish(run, trainer, student, evidence, evidence_line(evidence))
    return evidence


def evidence_line(e: dict) -> str:
    answers = ""
    if "answer_accuracy_before" in e:
        answers = (
            f"answer accuracy {e['answer_accuracy_before']:.2f} -> {e['answer_accuracy_after']:.2f} "
            f"(teacher {e['teacher_answer_accuracy']:.2f}), "
        )
    return (
        f"[distill] held-out prompts: {answers}KL to the teacher {e['kl_before']:.2f} -> {e['kl_after']:.2f}"
        + whole_assistant_line(e)
    )
