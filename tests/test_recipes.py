"""Every shipped recipe validates offline, and starts with the comment that says how to run it."""

import pytest
from conftest import REPO

from gptpipe.cli import run

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def test_recipes_exist():
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_recipe_validates(recipe, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    run(["validate", str(recipe)])
    assert "ok:" in capsys.readouterr().out
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# "), "a recipe starts with a comment giving the command that runs it"
    text = recipe.read_text()
    command = (
        "gptpipe sweep" if "metric:" in text else "gptpipe pipeline" if "stages:" in text else "gptpipe train"
    )
    assert command in recipe.read_text().split("stage:")[0]
