"""The tiny world: deterministic synthetic data for every stage, small enough to learn on a CPU in minutes.

A seeded generator invents people, each with a city, a job, an age and a pet, plus small-number
additions. Those facts become:

- ``pretrain``: documents (bios, fact lists, arithmetic worksheets, plain-text Q/A) — the corpus a
  base model learns the facts from. Held-out documents are new sentences about the same facts. ``asked``: 40
  documents of Q/A in the RL prompts' phrasing about the RL half (the demo's pretraining adds them).
- ``probes``: cloze prompts with one right continuation ("The age of Anna is" -> "34"), to check that
  pretraining stored facts (perplexity alone is a weak signal: it falls long before facts are recalled).
- ``sft``: chats in the ``messages`` format, one question and the assistant's answer in a fixed style
  ("Anna is 34 years old."). 30% of the questions are held out, so the eval split asks about facts
  the model read in pretraining but was never asked about in finetuning.
- ``comparisons``: prompt, chosen, rejected (TRL's conversational preference format). Rejected answers
  are wrong values, true-but-irrelevant facts, or off-style replies. Every fact is covered (a reward
  model does not generalize to facts it never judged); held-out pairs use a new question phrasing
  and new rejected answers. ``asked``: 520 pairs in the RL prompts' phrasing about their train half, the reference
  over a true fact about someone else (the demo's reward model adds them).
- ``rl_prompts``: prompts with their known right answer (``answer``) for RL and accuracy checks, asked with a
  phrasing no chat or comparison has ("Tell me how old Anna is."; only the ``asked`` splits of ``pretrain`` and
  ``comparisons`` do, for the train half), where the SFT model mostly fails (it answers without the subject:
  " is 34 years old.") and RL has something to learn. ``train`` asks about half of the facts of each kind,
  ``eval`` about the other half; ``unseen`` asks the ``eval`` half with yet another phrasing RL never trained on
  ("Say how old Anna is."): how far what RL learned carries over.
- ``tools``: two- and three-digit arithmetic answered by calling a calculator tool (``gptpipe.data.arithmetic``),
  held-out operand pairs in ``eval`` and, phrased as no data has, ``unseen``; ``chats``: SFT's training chats,
  every other one with the calculator shown (answered without a call: what a tool user must keep doing).

Every part has a ``train`` and an ``eval`` split. ``gptpipe data tinyworld --out DIR`` writes them as
``DIR/<part>/<split>.jsonl``; recipes read them as ``path: tinyworld:<part>``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from gptpipe.data import arithmetic
from gptpipe.data.answers import answers_in_first_sentence
from gptpipe.data.tinyworld_facts import (
    ANSWERS,
    CITIES,
    FACT_TEMPLATES,
    JOBS,
    OFF_STYLE,
    PETS,
    PROBE_TEMPLATES,
    QUESTIONS,
    RL_QUESTIONS,
    UNSEEN_QUESTIONS,
    Fact,
    make_world,
    split_facts,
    split_in_halves,
)
from gptpipe.errors import UserError
from gptpipe.files import cache_dir

VERSION = 14  # bump when the generated data changes (here or in tinyworld_facts), so caches are regenerated
PARTS = ("pretrain", "probes", "sft", "comparisons", "rl_prompts", "questions", "tools")


def _qa(f: Fact, question: str) -> str:
    """A fact as plain-text Q/A: the question (a template) and the house-style answer."""
    return f"Q: {f.render(question)} A: {f.render(ANSWERS[f.kind])}"


def _documents(facts: list[Fact], qa_facts: list[Fact], rng: random.Random, count: int) -> list[dict]:
    people: dict[str, list[Fact]] = {}
    for f in facts:
        if f.kind != "sum":
            people.setdefault(f.subject["n"], []).append(f)
    sums = [f for f in facts if f.kind == "sum"]
    kinds = ["bio", "bio", "facts", "sums", "qa"]
    docs = []
    for _ in range(count):
        kind = rng.choice(kinds)
        if kind == "bio":
            person = rng.choice(list(people.values()))
            chosen = rng.sample(person, len(person))
        elif kind == "facts":
            chosen = rng.sample([f for p in people.values() for f in p], 4)
        elif kind == "sums":
            chosen = rng.sample(sums, 5)
        else:  # plain-text Q/A teaches the question -> answer mapping before SFT (keeps SFT stable across seeds)
            chosen = rng.sample(qa_facts, 3)
            docs.append({"text": " ".join(_qa(f, rng.choice(QUESTIONS[f.kind])) for f in chosen)})
            continue
        docs.append({"text": " ".join(f.render(rng.choice(FACT_TEMPLATES[f.kind])) for f in chosen)})
    return docs


def _asked_documents(facts: list[Fact], rng: random.Random, count: int) -> list[dict]:
    """Plain-text Q/A documents in the RL phrasing, three facts each."""
    return [
        {"text": " ".join(_qa(f, RL_QUESTIONS[f.kind]) for f in rng.sample(facts, 3))} for _ in range(count)
    ]


def _someone_else_rows(facts: list[Fact], rng: random.Random, per_fact: int = 4) -> list[dict]:
    """Pre-written pairs in the RL phrasing: each fact's reference reply over a true statement about someone else
    (another person among ``facts``, with another value of the asked attribute; for a sum, a nearby sum)."""
    rows = []
    for f in facts:
        if f.kind == "sum":
            a, b = f.subject["a"], f.subject["b"]
            near = [xy for d in (-2, -1, 1, 2) for xy in ((a + d, b), (a, b + d))]  # another total
            others = [ANSWERS["sum"].format(a=x, b=y, v=x + y) for x, y in near if x > 0 and y > 0]
        else:
            others = sorted(
                {o.render(ANSWERS[o.kind]) for o in facts if o.kind == f.kind and o.value != f.value}
            )
        for rejected in rng.sample(others, min(per_fact, len(others))):
            prompt, chosen = _chat(f.render(RL_QUESTIONS[f.kind]), f.render(ANSWERS[f.kind]))
            rejected_reply = [{"role": "assistant", "content": rejected}]
            rows.append(
                {"prompt": prompt, "chosen": chosen, "rejected": rejected_reply, "mistake": "someone_else"}
            )
    return rows


def _chat(question: str, answer: str) -> tuple[list[dict], list[dict]]:
    return [{"role": "user", "content": question}], [{"role": "assistant", "content": answer}]


def _rejected_answers(fact: Fact, facts_by_subject: dict, rng: random.Random) -> list[tuple[str, str]]:
    """(kind of mistake, rejected reply) candidates for one fact."""
    pool = {"city": CITIES, "job": JOBS, "pet": PETS}.get(fact.kind)
    if pool is None:  # ages and sums: nearby wrong numbers
        wrong_values = [
            str(int(fact.value) + d) for d in (-5, -4, -3, -2, -1, 1, 2, 3, 4, 5) if int(fact.value) + d > 0
        ]
    else:
        wrong_values = [v for v in pool if v != fact.value]
    out = [("wrong_value", fact.render(ANSWERS[fact.kind], v)) for v in wrong_values]
    out += [("off_style", fact.render(t)) for t in OFF_STYLE]
    # True but irrelevant: another attribute of the same person (reward hacking bait for RL).
    for other in facts_by_subject.get(fact.subject.get("n"), []):
        if other.kind != fact.kind:
            out.append(("irrelevant", other.render(ANSWERS[other.kind])))
    rng.shuffle(out)
    return out


def generate(seed: int = 0) -> dict[str, dict[str, list[dict]]]:
    """All parts and splits of the tiny world as lists of rows."""
    rng = random.Random(seed)
    facts = make_world(seed)
    train_facts, heldout_facts = split_facts(facts, seed)
    by_subject: dict[str, list[Fact]] = {}
    for f in facts:
        if "n" in f.subject:
            by_subject.setdefault(f.subject["n"], []).append(f)

    out: dict[str, dict[str, list[dict]]] = {p: {} for p in PARTS}
    out["pretrain"]["train"] = _documents(facts, train_facts, rng, count=4000)
    out["pretrain"]["eval"] = _documents(facts, train_facts, random.Random(seed + 100), count=200)

    probes = [{"prompt": f.render(PROBE_TEMPLATES[f.kind]), "answer": f.value, "kind": f.kind} for f in facts]
    out["probes"]["train"], out["probes"]["eval"] = probes, probes  # pretraining sees every fact

    def sft_rows(fs: list[Fact], phrasings: range) -> list[dict]:
        rows = []
        for f in fs:
            for i in phrasings:
                prompt, reply = _chat(f.render(QUESTIONS[f.kind][i]), f.render(ANSWERS[f.kind]))
                rows.append({"messages": prompt + reply, "answer": f.value, "kind": f.kind})
        return rows

    out["sft"]["train"] = sft_rows(train_facts, range(3))
    out["sft"]["eval"] = sft_rows(heldout_facts, range(1))

    def comparison_rows(fs: list[Fact], phrasings: list[int], per_fact: int, skip: int) -> list[dict]:
        rows = []
        for f in fs:
            candidates = _rejected_answers(f, by_subject, random.Random(f"{seed}:{f.key}"))
            for j, (mistake, rejected) in enumerate(candidates[skip : skip + per_fact]):
                prompt, chosen = _chat(
                    f.render(QUESTIONS[f.kind][phrasings[j % len(phrasings)]]), f.render(ANSWERS[f.kind])
                )
                rows.append(
                    {
                        "prompt": prompt,
                        "chosen": chosen,
                        "rejected": [{"role": "assistant", "content": rejected}],
                        "mistake": mistake,
                    }
                )
        return rows

    # Train pairs cover every fact with the trained phrasings; held-out pairs use the unseen 4th phrasing and
    # rejected answers not used in training.
    # Ten pairs per fact: a reward model judges "is this the right value" only after seeing most wrong ones.
    out["comparisons"]["train"] = comparison_rows(facts, [0, 1, 2], per_fact=10, skip=0)
    out["comparisons"]["eval"] = comparison_rows(facts, [3], per_fact=1, skip=10)

    def prompt_rows(fs: list[Fact], questions: dict) -> list[dict]:
        return [
            {
                "prompt": _chat(f.render(questions[f.kind]), "")[0],
                "answer": f.value,
                "reference": f.render(ANSWERS[f.kind]),
                "kind": f.kind,
            }
            for f in fs
        ]

    # RL where it has something to learn: a phrasing in no training data (the SFT model answered 0.96 of its own
    # phrasings and RL on those taught nothing), about half of the facts; held out: the other half.
    rl_half, heldout_half = split_in_halves(facts, seed)
    out["rl_prompts"]["train"] = prompt_rows(rl_half, RL_QUESTIONS)
    out["rl_prompts"]["eval"] = prompt_rows(heldout_half, RL_QUESTIONS)
    out["rl_prompts"]["unseen"] = prompt_rows(heldout_half, UNSEEN_QUESTIONS)
    # Pretraining text that has seen the RL phrasing (1% of the documents, plain-text Q/A about the RL half only):
    # the base model knows the words, SFT never asks them in a chat. Without it the SFT model's samples of the RL
    # prompts named the subject 0.03-0.07 of the time and RL had little to raise (docs/rl.md).
    out["pretrain"]["asked"] = _asked_documents(rl_half, random.Random(seed + 7), count=40)
    # Pairs in the RL phrasing about the RL half: the reference over someone else's fact. The SFT model's wrong
    # replies to the RL prompts are mostly true facts about another person ("Tano lives in Cairo.", asked Delta's
    # city), which its ranked samples almost never put below the right one (docs/rl.md).
    out["comparisons"]["asked"] = _someone_else_rows(rl_half, random.Random(seed))
    # SFT's questions as prompts with their answers (stages that sample their own replies: distillation): train,
    # the SFT facts in SFT's three phrasings; eval, SFT's held-out questions (the SFT stage's answer accuracy).
    out["questions"]["train"] = [
        row for i in range(3) for row in prompt_rows(train_facts, {k: q[i] for k, q in QUESTIONS.items()})
    ]
    out["questions"]["eval"] = prompt_rows(heldout_facts, {k: q[0] for k, q in QUESTIONS.items()})
    out["tools"] = arithmetic.rows(seed)  # its own random stream: the parts above are as they were
    # SFT's chats, every other one with the calculator shown: a tool user still answers what needs no tool.
    # Trained on calls alone, the model called the calculator for every question once tools were shown.
    schemas = out["tools"]["train"][0]["tools"]
    out["tools"]["chats"] = [
        dict(row, tools=None if i % 2 else schemas) for i, row in enumerate(out["sft"]["train"])
    ]
    return out


def write(out_dir: str | Path, seed: int = 0, world: dict | None = None) -> Path:
    """Write every part as ``out_dir/<part>/<split>.jsonl`` (atomically: a folder appears only when complete);
    ``world``: ``generate(seed)``'s rows when the caller has them already."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    for part, splits in (world if world is not None else generate(seed)).items():
        (tmp / part).mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            with open(tmp / part / f"{split}.jsonl", "w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)
    (tmp / "README.md").write_text(
        f"Tiny world, seed {seed}, version {VERSION}. See gptpipe/data/tinyworld.py.\n"
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def ensure_tinyworld(seed: int = 0) -> Path:
    """The generated tiny world for ``seed`` in the cache folder, generating it on first use."""
    folder = cache_dir() / f"tinyworld-v{VERSION}-seed{seed}"
    if not (folder / "README.md").exists():
        try:
            write(folder, seed)
        except OSError:
            if not (folder / "README.md").exists():  # another process may have won the rename
                raise
    return folder


def label(rows: list[dict]) -> list[float]:
    """The tiny world's labeler for ``gptpipe rank`` (``gptpipe.data.tinyworld:label``), one prompt's samples at a
    time: 2 = the right answer in the house style (the reference reply word for word), 1 = the right answer in
    the first sentence but off style, 0 = a wrong answer or none. Needs the ``answer`` and ``reference`` fields
    that ``tinyworld:rl_prompts`` rows carry (``gptpipe generate`` copies them onto each sample)."""
    scores = []
    for row in rows:
        if "answer" not in row or "reference" not in row:
            raise UserError(
                "tinyworld:label needs samples of tinyworld:rl_prompts prompts (fields answer and reference)"
            )
        reply = row["completion"].strip()
        right = answers_in_first_sentence(reply, row["answer"])
        scores.append(2.0 if reply == row["reference"] else 1.0 if right else 0.0)
    return scores


def answer_reward(prompts, completions, answer, **columns) -> list[float]:
    """A reward function (TRL's signature; ``reward_funcs: [gptpipe.data.tinyworld:answer_reward]``) for
    ``tinyworld:rl_prompts``: 1.0 when the reply's first sentence holds the right answer, else 0.0 (the check
    the RL evidence reports as answer accuracy)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [
        1.0 if answers_in_first_sentence(t.strip(), a) else 0.0 for t, a in zip(texts, answer, strict=True)
    ]
