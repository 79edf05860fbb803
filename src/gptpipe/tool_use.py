"""Conversations in which the model calls tools: generate a turn, run its calls, append the results, go on.

Every open conversation generates its next assistant turn in one batch (``generation.complete``, special
tokens kept so the call markers survive); transformers' ``tokenizer.parse_response`` reads the turn back with
the response template the chat template carries (``gptpipe.data.chat_templates``). A turn without calls is the
answer; a turn with calls is appended with one ``tool`` message per call (``ToolBox.run``: a bad call's
result is the error text) and the conversation goes on, at most ``max_tool_calls`` rounds of calls. A turn
that cannot be read (a call whose JSON is cut off) ends the conversation and counts as an invalid call.

``tool_evidence`` is what a stage reports about tool use on held-out questions: the answer with the tools
offered and run, the same questions with none offered, and the share of calls that were valid.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from gptpipe.data.answers import answers_in_first_sentence
from gptpipe.data.chat_templates import end_of_turn_token
from gptpipe.data.sources import load_mixture
from gptpipe.errors import UserError
from gptpipe.generation import complete
from gptpipe.tools import ToolBox, load_tools

# A call the model got wrong, as opposed to a valid call whose tool failed (``raised``, ``timeout``).
INVALID = ("unreadable", "unknown_tool", "bad_arguments")


@dataclass
class Episode:
    """One conversation as the model carried it on: the messages (given, generated and tool results)."""

    messages: list[dict]
    reply: str = ""  # the content of the last assistant turn: the answer
    calls: int = 0
    valid_calls: int = 0
    failures: Counter = field(default_factory=Counter)
    answered: bool = False  # ended with a turn without calls (not cut off by max_tool_calls or unreadable)
    open: bool = True  # the model has another turn to take


def converse(
    model,
    tokenizer,
    conversations: list[list[dict]],
    toolbox: ToolBox | None,
    max_tool_calls: int = 3,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[Episode]:
    """Multi-turn replies to each conversation (greedy unless ``do_sample``), running the calls with
    ``toolbox`` (None: no tools are shown to the model, and a call it makes anyway gets an error as its result)."""
    schemas = toolbox.schemas if toolbox else None
    end = end_of_turn_token(tokenizer)
    episodes = [Episode([*c]) for c in conversations]
    for round_ in range(max_tool_calls + 1):
        active = [e for e in episodes if e.open]
        if not active:
            break
        prompts = [
            tokenizer.apply_chat_template(
                e.messages, tools=schemas, tokenize=False, add_generation_prompt=True
            )
            for e in active
        ]
        outputs = complete(
            model,
            tokenizer,
            prompts,
            max_new_tokens,
            do_sample,
            temperature,
            top_p,
            batch_size=batch_size,
            add_special_tokens=False,
            skip_special_tokens=False,
        )
        for episode, prompt, (raw,) in zip(active, prompts, outputs, strict=True):
            episode.open = False  # unless its calls are run below
            text = raw.split(end)[0] + end if end in raw else raw.replace(tokenizer.pad_token or "\0", "")
            message = _read(tokenizer, text, prompt, schemas)
            calls = _calls(message)
            if calls is None:  # a turn that cannot be read: an invalid call, and the end
                episode.calls += 1
                episode.failures["unreadable"] += 1
                ids = tokenizer.encode(text, add_special_tokens=False)
                episode.reply = tokenizer.decode(ids, skip_special_tokens=True).strip()
                continue
            episode.reply = (message.get("content") or "").strip()
            if not calls:
                episode.answered = True
                continue
            if round_ == max_tool_calls:  # one round of calls too many: no answer
                episode.calls += len(calls)
                episode.failures["over_max_tool_calls"] += len(calls)
                continue
            episode.messages.append({"role": "assistant", "content": episode.reply, "tool_calls": calls})
            results, kinds = run_calls(toolbox, calls)
            episode.messages += results
            episode.calls += len(calls)
            episode.valid_calls += sum(kind not in INVALID for kind in kinds)
            episode.failures.update(kind for kind in kinds if kind)
            episode.open = True
    return episodes


def run_calls(toolbox: ToolBox | None, calls: list[dict]) -> tuple[list[dict], list[str | None]]:
    """One ``tool`` message per call (a bad call's is the error text) and each call's failure kind or None."""
    results, kinds = [], []
    for call in calls:
        function = call["function"]
        if toolbox is None:
            result, kind = "Error: no tools are available", "unknown_tool"
        else:
            result, kind = toolbox.run(function["name"], function["arguments"])
        results.append({"role": "tool", "content": result})
        kinds.append(kind)
    return results, kinds


class ToolTurns:
    """The tool step of PPO's multi-turn rollout (``gptpipe.ppo.rollout.sample_with_tools``): read a generated
    turn as ``converse`` does, run its calls and give back the tokens that follow it, i.e. the chat template's
    own rendering of the ``tool`` messages and the next assistant turn's opening (the template must render a
    conversation's start the same whatever follows: transformers' templates do; one that does not is refused).

    ``turns[row]``: the messages each row added (the call turns and the results); ``counts``: calls, valid calls
    and failures by kind since ``reset``.
    """

    def __init__(self, tokenizer, toolbox: ToolBox):
        self.tokenizer, self.toolbox = tokenizer, toolbox
        self.reset(0)

    def reset(self, rows: int) -> None:
        self.turns: list[list[dict]] = [[] for _ in range(rows)]
        self.counts: Counter = Counter()

    def __call__(self, row: int, context: list[int], turn: list[int]) -> list[int] | None:
        calls = _calls(_read(self.tokenizer, turn, context, self.toolbox.schemas))
        if calls is None:  # unreadable: an invalid call, and the end of the episode
            self.counts.update(("calls", "unreadable"))
            return None
        if not calls:
            return None
        results, kinds = run_calls(self.toolbox, calls)
        # the tool's name beside its result: some templates (GPT-OSS) head a result with it
        results = [r | {"name": c["function"]["name"]} for r, c in zip(results, calls, strict=True)]
        self.counts["calls"] += len(calls)
        self.counts["valid_calls"] += sum(kind not in INVALID for kind in kinds)
        self.counts.update(kind for kind in kinds if kind)
        self.turns[row] += [{"role": "assistant", "content": "", "tool_calls": calls}, *results]
        return result_tokens(self.tokenizer, calls, results)


def result_tokens(tokenizer, calls: list[dict], results: list[dict]) -> list[int]:
    """The tokens the chat template writes after a turn with ``calls``: their ``results`` and the next assistant
    turn's opening, found as the difference of two renderings of a stand-in conversation ending in those calls
    (a turn's tokens are the model's own, never re-rendered)."""
    asked = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    before = tokenizer.apply_chat_template(asked, tokenize=True, return_dict=True)["input_ids"]
    after = tokenizer.apply_chat_template(
        asked + results, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    end = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    cut = (
        max(i for i, t in enumerate(before) if t == end) + 1
    )  # after the turn's end (a newline may follow it)
    if after[:cut] != before[:cut]:
        raise UserError(
            "tools: the chat template renders a conversation's start differently once tool results follow, so "
            "a rollout cannot go on from the model's own tokens; use chat_template: gptpipe or chatml"
        )
    return after[cut:]


def _read(tokenizer, text: str, prompt: str, schemas) -> dict | None:
    try:
        return tokenizer.parse_response(text, prefix=prompt, tools=schemas)
    except Exception:  # noqa: BLE001 - the model's output, not the run, is at fault: counted by the caller
        return None


def _calls(message: dict | None) -> list[dict] | None:
    """The turn's calls as ``{type, function: {name, arguments}}`` (arguments {} when left out; the tool box
    judges them), [] for none, None when one has no name (nothing to run or to show the model again)."""
    if message is None:
        return None
    calls = []
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            return None
        arguments = function.get("arguments", {})
        calls.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return calls


def recipe_tools(cfg, tokenizer) -> tuple[ToolBox | None, ToolTurns | None, list[dict] | None]:
    """An RL recipe's tools: (the tool box, the tool step its rollouts and evaluations run calls with, the
    ``tool_datasets`` rows), all None without ``tools``."""
    if not cfg.tools:
        return None, None, None
    toolbox = ToolBox(load_tools(cfg.tools), cfg.tool_timeout)
    return toolbox, ToolTurns(tokenizer, toolbox), tool_questions(cfg)


def tool_questions(cfg) -> list[dict] | None:
    """A recipe's ``tool_datasets`` rows (``messages``, ``answer``), or None without them."""
    if not cfg.tool_datasets:
        return None
    return list(load_mixture(cfg.tool_datasets, ["messages", "answer"], seed=cfg.seed))


def question(row: dict) -> list[dict]:
    """A held-out tool conversation's question: its messages before the first assistant turn (all of them when
    the row is a question alone)."""
    messages = row["messages"]
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    return row["messages"][:first]


def tool_evidence(
    model,
    tokenizer,
    rows: list[dict],
    toolbox: ToolBox,
    max_tool_calls: int = 3,
    max_new_tokens: int = 64,
    without_tools: bool = True,
) -> dict:
    """Held-out questions (``messages``, ``answer``) answered with the tools offered and run, and without.

    ``tool_answer_accuracy``: the right answer in the first sentence of the final reply, tools offered;
    ``no_tool_answer_accuracy``: the same, no tools shown (what the model does in its head);
    ``tool_call_validity``: calls that were readable, named a known tool and fit its schema, over calls made
    (None without calls); ``tool_calls_per_answer``: calls per question, tools offered. ``without_tools``
    false: the questions are not asked a second time without tools.
    """
    questions = [question(r) for r in rows]
    found: dict = {"tool_questions": len(rows)}
    for prefix, box in (("tool_", toolbox), ("no_tool_", None))[: 2 if without_tools else 1]:
        episodes = converse(model, tokenizer, questions, box, max_tool_calls, max_new_tokens)
        right = [answers_in_first_sentence(e.reply, r["answer"]) for e, r in zip(episodes, rows, strict=True)]
        found[f"{prefix}answer_accuracy"] = sum(right) / len(rows)
        if box is None:
            continue
        calls = sum(e.calls for e in episodes)
        found["tool_call_validity"] = sum(e.valid_calls for e in episodes) / calls if calls else None
        found["tool_calls_per_answer"] = calls / len(rows)
        found["tool_failures"] = dict(sum((e.failures for e in episodes), Counter()))
        found["tool_examples"] = [
            {
                "prompt": q[-1]["content"],
                "turns": [shown(m) for m in e.messages[len(q) :]],
                "reply": e.reply,
            }
            for q, e in zip(questions[:3], episodes, strict=False)
        ]
    return found


# The evidence's keys, each reported before and after (``<key>_before``, ``<key>_after``).
TOOL_KEYS = ("tool_answer_accuracy", "no_tool_answer_accuracy", "tool_call_validity", "tool_calls_per_answer")


def tool_line(evidence: dict) -> str:
    """The evidence in one line: answers with tools and without, valid calls, calls per answer."""

    def share(key):
        value = evidence.get(key)
        return "-" if value is None else f"{value:.2f}"

    names = ("answers with tools", "without", "valid calls", "calls per answer")
    return ", ".join(
        f"{name} {share(key + '_before')} -> {share(key + '_after')}"
        for name, key in zip(names, TOOL_KEYS, strict=True)
    )


def shown(message: dict) -> str:
    """A generated or tool message in one line, as the evidence shows it."""
    if message["role"] == "tool":
        return f"tool -> {message['content']}"
    calls = [c["function"] for c in message.get("tool_calls") or []]
    return "; ".join(f"call {c['name']}({c.get('arguments')})" for c in calls) or message["content"]
