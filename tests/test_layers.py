"""The code's shape (docs/architecture.md): layers import downward only, with no cycle hidden in a
function-level import; stage modules never import each other; PPO's math knows nothing of faults, runs or
tracking; no source file passes 400 lines."""

import ast
from pathlib import Path

from conftest import REPO

SRC = REPO / "src"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / "gptpipe").rglob("*.py")):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The gptpipe modules an import statement loads (``from gptpipe.data import ranking`` -> gptpipe.data.ranking)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = (
                module.split(".")[: -node.level]
                if not MODULES[module].name == "__init__.py"
                else module.split(".")
            )
            base = ".".join([*package, base] if base else package)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    found = set()
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name.startswith("gptpipe") and name not in (module, "gptpipe"):
            found.add(name)
    return found


def _imports(top_level_only: bool = False) -> dict[str, dict[str, int]]:
    """module -> {imported module: line}, every import statement counted (in functions too)."""
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        nodes = tree.body if top_level_only else ast.walk(tree)
        graph[module] = {
            target: node.lineno
            for node in nodes
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for target in _imported(module, node)
        }
    return graph


def _cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node):
        state[node], _ = "open", path.append(node)
        for target in sorted(graph.get(node, {})):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_counting_function_level_imports():
    cycle = _cycle(_imports())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b": 1}, "b": {}, "c": {"a": 1}}) is None


# The entry point imports each subcommand's module when it runs (start-up time: see cli.py); the cycle test
# above still counts those imports.
DEFERRED_OK = {"gptpipe.cli"}


def test_gptpipe_modules_are_imported_at_the_top():
    """A gptpipe import inside a function is how cycles hide; third-party ones may stay (optional extras)."""
    every, top = _imports(), _imports(top_level_only=True)
    deferred = [
        f"{MODULES[m].relative_to(REPO)}:{line} imports {target}"
        for m, targets in every.items()
        if m not in DEFERRED_OK
        for target, line in targets.items()
        if target not in top[m]
    ]
    assert not deferred, deferred


def test_stage_modules_do_not_import_each_other():
    imports = _imports()
    shared = [
        f"{m} imports {t}"
        for m, targets in imports.items()
        if m.startswith("gptpipe.stages.")
        for t in targets
        if t.startswith("gptpipe.stages.")
    ]
    assert not shared, shared


def test_ppo_math_imports_only_ppo_and_leaf_modules():
    leaves = {"gptpipe.errors", "gptpipe.finite", "gptpipe.files"}
    math = ("advantages", "kl", "losses", "rollout", "value", "iteration")
    imports = _imports()
    wrong = [
        f"gptpipe.ppo.{m} imports {t}"
        for m in math
        for t in imports[f"gptpipe.ppo.{m}"]
        if not t.startswith("gptpipe.ppo") and t not in leaves
    ]
    assert not wrong, wrong


def test_leaf_modules_import_nothing_of_gptpipe():
    imports = _imports()
    for leaf in (
        "gptpipe.errors",
        "gptpipe.files",
        "gptpipe.finite",
        "gptpipe.data.answers",
        "gptpipe.hacking",
    ):
        assert not imports[leaf], (leaf, imports[leaf])


def test_no_source_file_over_400_lines():
    long = {
        str(p.relative_to(REPO)): n
        for p in MODULES.values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long


# The layers of docs/architecture.md, lowest first: a module imports its own layer or lower ones only.
LAYERS = [
    ["errors", "files", "finite", "internals", "data.answers", "hacking"],
    [
        "config",
        "rewards",
        "plugins",
        "tools",
        "data.arithmetic",
        "data.chat_templates",
        "data.formats",
        "data.packing",
        "data.preferences",
        "data.ranking",
    ]
    + ["data.tinyworld_facts", "data.tinyworld", "data", "benchmark_tasks"],
    ["data.sources", "recipe", "data.prepared"],
    [
        "modeling",
        "sft_trainer",
        "generation",
        "tool_use",
        "scoring",
        "likelihood",
        "runs",
        "tracking",
        "report",
        "faults",
        "distributed",
        "ppo",
    ],
    [
        "rlhf",
        "ptx_term",
        "watching",
        "preference",
        "replies",
        "compare",
        "export",
        "benchmarks",
        "ppo.trainer",
    ],
    ["stages"],
    ["runner"],
    ["pipeline", "sweep"],
    ["cli", "__main__"],
]


def _layer(module: str) -> int:
    name = module.removeprefix("gptpipe.")
    for key in (name, name.split(".")[0]):  # the module itself, else its package (stages.sft: stages)
        for depth, members in enumerate(LAYERS):
            if key in members:
                return depth
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")


def test_layers_import_downward_only():
    upward = [
        f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
        for m, targets in _imports().items()
        if m != "gptpipe"
        for t in targets
        if _layer(t) > _layer(m)
    ]
    assert not upward, upward


def test_the_documented_layers_are_the_tested_ones():
    doc = (REPO / "docs/architecture.md").read_text()
    for depth, members in enumerate(LAYERS):
        row = next(line for line in doc.splitlines() if line.startswith(f"| {depth} "))
        for name in members:
            if name not in ("data", "stages", "ppo"):
                assert f"`{name}`" in row or f"`{name.split('.')[-1]}`" in row, (depth, name, row)


def test_ppo_functions_are_small():
    """The PPO code we own reads in pieces: no function over 60 lines or 8 parameters."""
    big = []
    for path in sorted((SRC / "gptpipe/ppo").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                params = [a.arg for a in node.args.args + node.args.kwonlyargs if a.arg != "self"]
                if node.end_lineno - node.lineno + 1 > 60 or len(params) > 8:
                    big.append(f"{path.name}:{node.lineno} {node.name}")
    assert not big, big
