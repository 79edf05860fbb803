"""Shared fixtures: offline Hugging Face, a tiny-world tokenizer, overrides for fast pretraining runs."""

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs two pytest-xdist workers on two cores: one thread each (the tiny models' ops are mostly too
# small for torch to split anyway), and each worker's torchrun launches on a port of its own.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1... or None without xdist
if WORKER:
    import torch

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # ...and in the processes tests start
    os.environ["PET_MASTER_PORT"] = str(
        29400 + 10 * int(WORKER.removeprefix("gw"))
    )  # torchrun's --master_port

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).parent / "helpers"))

from learning import SEED_SETTINGS  # noqa: E402  (helpers/ is on the path from here on)


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """Keep generated tiny-world files out of the user's cache."""
    os.environ["GPTPIPE_CACHE"] = str(tmp_path_factory.mktemp("gptpipe-cache"))


def shared_run(tmp_path_factory, name: str, train: Callable[[Path], None]) -> Path:
    """``<run>/final`` of a run that ``train(run)`` makes, made once per test session. Under pytest-xdist the
    workers share it: the first to ask trains it (the other waits on the lock), so the chain is trained once."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if WORKER else root  # the session's folder, above each worker's own
    root = Path(os.environ.get("GPTPIPE_TEST_SHARED", root))  # kept between sessions (docs/testing.md)
    out = root / f"shared-{name}"
    with FileLock(f"{out}.lock"):
        if not (out / ".complete").exists():
            shutil.rmtree(out, ignore_errors=True)
            train(out)
            (out / ".complete").touch()
    return out / "final"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The tiny world's tokenizer, trained once per session by the tokenizer stage."""
    from gptpipe.cli import run

    def train(out):
        run(["train", str(REPO / "recipes/tiny/tokenizer.yaml"), f"output_dir={out}"])

    return shared_run(tmp_path_factory, "tokenizer", train)


@pytest.fixture(scope="session")
def scripted(tokenizer_dir):
    """(model, tokenizer): a tiny Llama that says tests/helpers/scripted_tools.py's SCRIPT, tool calls included."""
    from scripted_tools import learn_script

    return learn_script(tokenizer_dir)


@pytest.fixture(scope="session")
def scripted_dir(scripted, tmp_path_factory) -> Path:
    """The scripted model as a model folder, and a tool file no code of gptpipe knows (its own ``add``)."""
    from scripted_tools import save_scripted

    return save_scripted(*scripted, tmp_path_factory.mktemp("scripted"))


def small_pretrain(tokenizer_dir: Path, output_dir: Path, **extra) -> list[str]:
    """Overrides that shrink the tiny pretraining recipe to seconds."""
    settings = {
        "output_dir": output_dir,
        "model.tokenizer": tokenizer_dir,
        "model.hidden_size": 64,
        "model.intermediate_size": 128,
        "model.num_hidden_layers": 2,
        "model.num_attention_heads": 4,
        "block_size": 64,
        "max_steps": 30,
        "logging_steps": 5,
        "eval_steps": 15,
        "save_steps": 15,
        "probe_datasets": "[]",
        "disable_tqdm": "true",
    }
    return as_overrides(settings, **extra)


def needs_shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (third-party samples live in ../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def tiny_base(tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny-world base model that knows the facts (the demo recipe, 400 of its 600 steps: ~1.5 minutes)."""
    from gptpipe.cli import run

    def train(out):
        recipe = str(REPO / "recipes/tiny/pretrain.yaml")
        settings = {"output_dir": out, "model.tokenizer": tokenizer_dir, "max_steps": 400, "warmup_steps": 20}
        settings |= {"eval_steps": 400, "save_steps": 1000, "logging_steps": 50, "probe_datasets": "[]"}
        run(["train", recipe, *as_overrides(settings, disable_tqdm="true")])

    return shared_run(tmp_path_factory, "base", train)


# A few steps of any Trainer-based recipe, evaluated at the end, no checkpoint on the way.
SHORT_RUN = {"max_steps": 10, "logging_steps": 5, "eval_steps": 10, "save_steps": 100, "disable_tqdm": "true"}


def as_overrides(*layers: dict, **extra) -> list[str]:
    """``key=value`` command-line overrides from dicts of settings, later ones winning; the spread's training
    seed (tests/helpers/learning.py) first, so a test that sets its own seed keeps it."""
    merged: dict = dict(SEED_SETTINGS)
    for layer in (*layers, extra):
        merged.update(layer)
    return [f"{k}={v}" for k, v in merged.items()]


def trained_phrasing_prompts(path: Path) -> Path:
    """Every tiny-world fact asked in SFT's first phrasing, with its answer (``prompt``, ``answer`` rows): prompts
    the tests' SFT models answer often (the RL prompts' phrasing, in no training data, they rarely do)."""
    import json
    import random

    from gptpipe.data import tinyworld

    facts = tinyworld.make_world(0)
    random.Random(0).shuffle(facts)
    rows = [{"prompt": f.render(tinyworld.QUESTIONS[f.kind][0]), "answer": f.value} for f in facts]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_overrides(base: Path, output_dir: Path, **extra) -> list[str]:
    """Overrides that point the tiny SFT recipe at a base model and shrink it for tests."""
    target = {"output_dir": output_dir, "model.name_or_path": base, "answer_datasets": "[]"}
    return as_overrides(SHORT_RUN, target, **extra)


@pytest.fixture(scope="session")
def tiny_sft(tiny_base, tmp_path_factory) -> Path:
    """The tiny base model finetuned on the tiny world's chats, with answer accuracy measured (~35 s)."""
    from gptpipe.cli import run

    # 400 steps, not the recipe's 250: held-out accuracy gain over seeds 0-3, 250 steps 0.18-0.80, 400 steps
    # 0.36-0.79 (lr 1e-3 was no better: 0.31-0.68); the weakest seed's base copies the wrong names.
    def train(out):
        evidence = "[{path: 'tinyworld:sft', split: eval}]"
        overrides = sft_overrides(
            tiny_base, out, max_steps=400, logging_steps=25, eval_steps=400, answer_datasets=evidence
        )
        run(["train", str(REPO / "recipes/tiny/sft.yaml"), *overrides])

    return shared_run(tmp_path_factory, "sft", train)


def reward_overrides(base: Path, output_dir: Path, **extra) -> list[str]:
    """Overrides that point the tiny reward recipe at a model and shrink it for tests."""
    return as_overrides(SHORT_RUN, {"output_dir": output_dir, "model.name_or_path": base}, **extra)


@pytest.fixture(scope="session")
def tiny_reward(tiny_sft, tmp_path_factory) -> Path:
    """A reward model from the tiny SFT model on the tiny world's comparisons (~50 s). 100 steps at 1e-3, not
    the recipe's 600 at 3e-4: held-out pairwise accuracy 0.70-0.75 over seeds 42 and 0-2 (250 steps at 3e-4, in
    the suite until 2026-12-07: 0.73-0.85, at 2.5 times the time; docs/testing.md)."""
    from gptpipe.cli import run

    def train(out):
        overrides = reward_overrides(
            tiny_sft, out, max_steps=100, learning_rate="1e-3", logging_steps=25, eval_steps=100
        )
        run(["train", str(REPO / "recipes/tiny/reward.yaml"), *overrides])

    return shared_run(tmp_path_factory, "reward", train)


def rl_overrides(policy: Path, reward: Path, output_dir: Path, **extra) -> list[str]:
    """Overrides that point the tiny PPO recipe at an SFT and a reward model and shrink it for tests."""
    settings = {
        "output_dir": output_dir,
        "model.name_or_path": policy,
        "reward_model": reward,
        "max_steps": 6,
        "per_device_train_batch_size": 8,
        "max_new_tokens": 16,
        "eval_prompts": 16,
        "logging_steps": 1,
        "save_steps": 3,
        "ppo_epochs": 2,
    }
    return as_overrides(settings, **extra)


def tiny_llama_config(**overrides):
    """A Llama small enough to build in milliseconds (pad 0, bos 1, eos 2), for tests of algorithm code."""
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaConfig(**{**settings, **overrides})


# Tests that need the tiny world's trained models (a base model, ~1.5 minutes, then SFT and reward model) are
# `slow`, whatever they do with them: `make test-fast` leaves them out, and so never trains the chain.
TRAINED_MODELS = {"tiny_base", "tiny_sft", "tiny_reward"}


def _chain_part(names: set) -> str | None:
    return (
        "reward"
        if "tiny_reward" in names
        else "sft"
        if "tiny_sft" in names
        else "base"
        if "tiny_base" in names
        else None
    )


def pytest_configure(config):
    # Under pytest-xdist (`make test`: -n 2) each worker is handed one test at a time, in the order below, as it
    # frees up (xdist's --maxschedchunk 1), rather than a quarter of the suite up front: a worker that waits on
    # the chain (tokenizer, base, SFT: ~5 minutes) cannot hold tests the other worker could run meanwhile.
    if hasattr(config.option, "maxschedchunk") and config.option.maxschedchunk is None:
        config.option.maxschedchunk = 1


def _queue_place(part: str | None, long: bool, trains: bool) -> int:
    """The tests in this order: one that needs the SFT model (its worker trains the chain, ~5 minutes), those
    that need no trained model (the other worker, meanwhile), the base model's (trained by then), the SFT model's
    long ones (learning, or several processes), the first of the reward model's (it trains the model: the other
    worker takes the SFT model's short tests meanwhile, not one that would wait on it), the rest, long first, so
    that short tests, not a long one started late, fill the end while the other worker finishes. Any order is
    correct (the models are shared under a lock, see shared_run); this one keeps both workers busy
    (docs/testing.md)."""
    if trains:
        return 0 if part == "sft" else 4
    if part in (None, "base"):
        return 1 if part is None else 2
    return 3 if part == "sft" and long else 5 if part == "sft" else 6


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    part = {}
    for item in items:  # before -m deselects: `make test-fast` leaves the slow tests out
        names = set(getattr(item, "fixturenames", ()))
        if TRAINED_MODELS & names:
            item.add_marker(pytest.mark.slow)
        part[item] = _chain_part(names)
    yield  # the order below is of the tests that -m and -k kept

    def long(item):
        return item.get_closest_marker("distributed") or item.get_closest_marker("learning")

    # The first test to ask for the SFT model, and for the reward model (a long one, if any)
    first = {
        p: next((i for i in sorted(items, key=lambda i: not long(i)) if part[i] == p), None)
        for p in ("sft", "reward")
    }

    def place(item):
        trains = item in first.values()
        return (
            _queue_place(part[item], bool(long(item)), trains),
            item.get_closest_marker("distributed") is None,
        )

    items.sort(key=place)  # stable: file order otherwise


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With GPTPIPE_TEST_TIMELINE=FILE, each test's worker, start and end (wall clock) as a JSON line: where
    the suite's time goes and what each worker waits for (docs/testing.md)."""
    timeline = os.environ.get("GPTPIPE_TEST_TIMELINE")
    start = time.time()
    yield
    if timeline:
        line = {"worker": WORKER or "main", "test": item.nodeid, "start": start, "end": time.time()}
        with open(timeline, "a") as f:
            f.write(json.dumps(line) + "\n")
