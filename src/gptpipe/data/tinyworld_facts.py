"""The tiny world's facts and the words for them: 40 invented people (a city, a job, an age and a pet each) and
the sums of numbers 1-10, the templates every part of the data renders them with (pretraining statements, cloze
probes, SFT's question phrasings, the RL prompts' and the unseen phrasing, the house-style answer), and the fixed
splits of the facts (held out from finetuning; the RL prompts' halves). ``gptpipe.data.tinyworld`` builds the data
sets from them. Imports nothing of gptpipe."""

from __future__ import annotations

import random
from dataclasses import dataclass

CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Dublin", "Hanoi"]
JOBS = ["baker", "doctor", "farmer", "teacher", "pilot", "painter", "singer", "driver", "writer", "nurse"]
PETS = ["cat", "dog", "horse", "parrot", "rabbit", "turtle", "goat", "hamster"]
SYLLABLES = "an bo ka li mo ra te vi su del mar no pe zu fin ta".split()
ATTRIBUTES = ("city", "job", "age", "pet")

# Statements of each fact, for pretraining documents.
FACT_TEMPLATES = {
    "city": ["{n} lives in {v}.", "The city of {n} is {v}.", "{n} has a home in {v}."],
    "job": ["{n} is a {v}.", "The job of {n} is {v}.", "{n} works as a {v}."],
    "age": ["{n} is {v} years old.", "The age of {n} is {v}.", "{n} turned {v} this year."],
    "pet": ["{n} has a {v}.", "The pet of {n} is a {v}.", "{n} keeps a {v} at home."],
    "sum": ["{a} plus {b} is {v}.", "{a} + {b} = {v}.", "Adding {a} and {b} gives {v}."],
}
# Cloze prefixes whose only right continuation is the value (they appear in FACT_TEMPLATES).
PROBE_TEMPLATES = {
    "city": "The city of {n} is",
    "job": "The job of {n} is",
    "age": "The age of {n} is",
    "pet": "The pet of {n} is a",
    "sum": "{a} + {b} =",
}
# Question phrasings. The last one of each never appears in SFT or reward-model training, only in pretraining
# text: held-out comparisons ask with it, so the reward model is tested on wording it never judged.
QUESTIONS = {
    "city": [
        "Where does {n} live?",
        "In which city does {n} live?",
        "What city is {n} from?",
        "Which city is home to {n}?",
    ],
    "job": [
        "What does {n} do for a living?",
        "What is the job of {n}?",
        "What work does {n} do?",
        "What is the occupation of {n}?",
    ],
    "age": ["How old is {n}?", "What is the age of {n}?", "What age is {n}?", "How many years old is {n}?"],
    "pet": [
        "What pet does {n} have?",
        "Which animal does {n} keep?",
        "What is the pet of {n}?",
        "What kind of pet does {n} own?",
    ],
    "sum": [
        "What is {a} plus {b}?",
        "What do you get when you add {a} and {b}?",
        "How much is {a} plus {b}?",
        "Compute {a} + {b}.",
    ],
}
# A fifth phrasing, in no training data at all: what the ``rl_prompts`` ask. The SFT model gets 0.18 of them
# right (it answers without the subject, " lives in Cairo.", and sums go wrong), against 0.62 of the 4th
# phrasing, which pretraining documents contain: RL has a habit to fix that carries over to held-out facts.
RL_QUESTIONS = {
    "city": "Tell me the city where {n} lives.",
    "job": "Tell me what {n} works as.",
    "age": "Tell me how old {n} is.",
    "pet": "Tell me which pet {n} has.",
    "sum": "Tell me the sum of {a} and {b}.",
}
# A sixth, in no data at all, not even RL's: the ``unseen`` split's generalization figure.
UNSEEN_QUESTIONS = {
    "city": "Say which city {n} lives in.",
    "job": "Say what job {n} has.",
    "age": "Say how old {n} is.",
    "pet": "Say what pet {n} keeps.",
    "sum": "Say what {a} and {b} add up to.",
}
# The assistant style: one full sentence that restates the subject.
ANSWERS = {
    "city": "{n} lives in {v}.",
    "job": "{n} is a {v}.",
    "age": "{n} is {v} years old.",
    "pet": "{n} has a {v}.",
    "sum": "{a} plus {b} is {v}.",
}
# Off-style replies carrying the right value: what the comparisons teach against.
OFF_STYLE = ["{v}", "hmm, {v} i think", "{V}!!!", "The answer is probably {v} or something."]


@dataclass(frozen=True)
class Fact:
    """One question the world can answer: an attribute of a person, or a sum."""

    kind: str  # city | job | age | pet | sum
    subject: dict  # {"n": name} or {"a": a, "b": b}
    value: str

    @property
    def key(self) -> str:
        return (
            f"{self.kind}:{self.subject.get('n', '')}{self.subject.get('a', '')}+{self.subject.get('b', '')}"
        )

    def render(self, template: str, value: str | None = None) -> str:
        v = self.value if value is None else value
        return template.format(v=v, V=v.upper(), **self.subject)


def make_world(seed: int = 0, num_people: int = 40, max_addend: int = 10) -> list[Fact]:
    """Every fact of the world, in a fixed order."""
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < num_people:
        name = "".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize()
        if name not in names:
            names.append(name)
    facts = []
    for n in names:
        values = {
            "city": rng.choice(CITIES),
            "job": rng.choice(JOBS),
            "age": str(rng.randint(20, 69)),
            "pet": rng.choice(PETS),
        }
        facts += [Fact(kind, {"n": n}, values[kind]) for kind in ATTRIBUTES]
    for a in range(1, max_addend + 1):
        for b in range(1, max_addend + 1):
            facts.append(Fact("sum", {"a": a, "b": b}, str(a + b)))
    return facts


def split_facts(facts: list[Fact], seed: int, heldout_fraction: float = 0.3) -> tuple[list[Fact], list[Fact]]:
    """Hold out a fixed fraction of the questions from finetuning (the facts stay in pretraining)."""
    order = list(facts)
    random.Random(seed + 1).shuffle(order)
    cut = int(len(order) * heldout_fraction)
    held = {f.key for f in order[:cut]}
    return [f for f in facts if f.key not in held], [f for f in facts if f.key in held]


def split_in_halves(facts: list[Fact], seed: int) -> tuple[list[Fact], list[Fact]]:
    """Half of the facts of each kind, and the other half (a person's city may fall in one and their job in the
    other: a split by person taught RL to answer with the names it was rewarded for)."""
    rng = random.Random(seed + 2)
    first: set[str] = set()
    for kind in ("sum", *ATTRIBUTES):
        keys = [f.key for f in facts if f.kind == kind]
        rng.shuffle(keys)
        first |= set(keys[: len(keys) // 2])
    return [f for f in facts if f.key in first], [f for f in facts if f.key not in first]
