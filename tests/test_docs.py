"""Docs that cannot rot: every recipe path, `gptpipe` subcommand and flag, and make target that README.md and
docs/ name exists (the recipes are checked by `gptpipe validate` in tests/test_recipes.py), so a rename breaks
the suite, not the reader."""

import argparse
import re

import pytest
from conftest import REPO

from gptpipe.cli import build_parser

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RECIPE = re.compile(r"recipes/[\w./*-]+\.yaml")
# `gptpipe <subcommand> ...` up to the end of the line (or of an inline code span)
COMMAND = re.compile(r"(?:^|[\s`(/])gptpipe ([a-z]+)([^`\n]*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z-]*)")
MAKE = re.compile(r"(?:^|[\s`])make ([a-z][\w-]*)")


def _subcommands() -> dict[str, set[str]]:
    """{subcommand: its flags} from the CLI's own parser."""
    parser = build_parser()
    actions = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {}
    for name, sub in actions.choices.items():
        found = {option for action in sub._actions for option in action.option_strings}
        for nested in (a for a in sub._actions if isinstance(a, argparse._SubParsersAction)):
            found |= {o for p in nested.choices.values() for a in p._actions for o in a.option_strings}
        flags[name] = found
    return flags


def _code(doc) -> list[tuple[int, str]]:
    """(line number, code) for each line of a fenced block and each inline `code` span: where commands are."""
    found, fenced = [], False
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced and not line.lstrip().startswith("#"):
            found.append((number, re.split(r"\s#\s", line)[0]))  # a shell comment is prose
        else:
            found += [(number, span) for span in re.findall(r"`([^`]+)`", line)]
    return found


def _mentions(pattern: re.Pattern) -> list[tuple[str, int, re.Match]]:
    return [
        (doc.name, number, match)
        for doc in DOCS
        for number, code in _code(doc)
        for match in pattern.finditer(code)
    ]


def test_every_recipe_the_docs_name_exists():
    missing = []
    for doc, line, match in _mentions(RECIPE):
        if not list(REPO.glob(match.group(0))):
            missing.append(f"{doc}:{line}: {match.group(0)}")
    assert not missing, missing


def test_every_gptpipe_command_and_flag_the_docs_name_exists():
    flags = _subcommands()
    wrong = []
    for doc, line, match in _mentions(COMMAND):
        command, rest = match.group(1), match.group(2)
        if command not in flags:
            wrong.append(f"{doc}:{line}: gptpipe {command}")
            continue
        # flags of this command only: stop at a shell pipe, a comment or the next command
        rest = re.split(r"\s(?:#|\||&&|;)\s|\bgptpipe\b|\baccelerate\b", rest)[0]
        wrong += [
            f"{doc}:{line}: gptpipe {command} {f}" for f in FLAG.findall(rest) if f not in flags[command]
        ]
    assert not wrong, wrong


def test_every_link_between_the_docs_resolves():
    """README.md links to the docs/ pages by topic, and they to each other: no link points at nothing."""
    broken = [
        f"{doc.name}: {target}"
        for doc in DOCS
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text())
        if not (doc.parent / target).exists()
    ]
    assert not broken, broken
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)\)", (REPO / "README.md").read_text()))
    assert linked == {d.name for d in DOCS[1:]}  # every page is reachable from the README


def test_every_make_target_the_docs_name_exists():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
    missing = [
        f"{doc}:{line}: make {match.group(1)}"
        for doc, line, match in _mentions(MAKE)
        if match.group(1) not in targets
    ]
    assert not missing, missing


@pytest.mark.parametrize(
    "text, found",
    [
        ("run `gptpipe evall runs/x` now", ["gptpipe evall"]),
        ("gptpipe eval m --taskz t", ["gptpipe eval --taskz"]),
    ],
)
def test_a_renamed_command_or_flag_is_caught(text, found):
    """The checks above would fail on a misspelled command or flag (what they find in this text)."""
    flags = _subcommands()
    wrong = []
    for match in COMMAND.finditer(text):
        command, rest = match.group(1), match.group(2)
        if command not in flags:
            wrong.append(f"gptpipe {command}")
        else:
            wrong += [f"gptpipe {command} {f}" for f in FLAG.findall(rest) if f not in flags[command]]
    assert wrong == found
