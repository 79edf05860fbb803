"""The ``gptpipe`` command: argument parsing only; the work happens in config, data and the stages.

gptpipe train RECIPE [key=value ...]     run the stage the recipe names
gptpipe pipeline FILE [stage.key=value ...] [--rerun STAGE]   run stage recipes in order, wired together
gptpipe sweep FILE [--emit slurm|commands]   grid/random search over a recipe or pipeline
gptpipe prepare RECIPE [key=value ...]   tokenize and pack a stage's data ahead; training reuses it
gptpipe validate RECIPE [RECIPE ...]     parse and check recipes and pipelines (no training, no network)
gptpipe data tinyworld --out DIR         write the synthetic tiny-world data set
gptpipe chat MODEL                       talk to a trained model (multi-turn, streamed)
gptpipe generate MODEL --prompts FILE    sample replies for a file of prompts (jsonl out)
gptpipe rank SAMPLES --labeler MOD:FN    rank generated samples into comparisons (or --rankings FILE)
gptpipe score MODEL --pairs FILE         a reward model's pairwise accuracy on a preference file
gptpipe score MODEL --texts FILE         a reward model's score of each conversation or text
gptpipe eval MODEL --tasks T1,T2        lm-evaluation-harness tasks on a model folder (eval-<tasks>.json beside it)
gptpipe export RUN --out DIR             a plain Hugging Face folder with a model card (--merge-lora, --dtype)
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from gptpipe.errors import Preempted, UserError

# Each subcommand imports what it runs when it runs (the one place gptpipe defers its own imports): the
# libraries behind a stage take seconds to load, which `--help`, `--launch` (it hands over to accelerate at
# once), `data` or `rank` should not pay, and neither should every process of a launch for the other commands.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptpipe", description="Train GPT assistants stage by stage.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run one stage from a recipe")
    train.add_argument("recipe", help="YAML recipe, e.g. recipes/tiny/pretrain.yaml")
    train.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. max_steps=20 model.hidden_size=64"
    )
    _launch_flags(train)

    pipe = sub.add_parser("pipeline", help="run a pipeline of stage recipes in order")
    pipe.add_argument("pipeline", help="pipeline YAML, e.g. recipes/tiny/pipeline.yaml")
    pipe.add_argument("overrides", nargs="*", help="STAGE.key=value overrides, e.g. sft.learning_rate=1e-4")
    pipe.add_argument(
        "--rerun",
        action="append",
        default=[],
        metavar="STAGE",
        help="train STAGE again (and the stages after it)",
    )
    pipe.add_argument("--output-dir", default=None, help="replace the pipeline's output_dir")
    _launch_flags(pipe)

    sweep = sub.add_parser("sweep", help="grid or random search over a recipe or pipeline (Optuna)")
    sweep.add_argument("sweep", help="sweep YAML, e.g. recipes/tiny/sweep.yaml")
    sweep.add_argument(
        "--emit", choices=["slurm", "commands"], default=None, help="write cluster jobs instead"
    )
    sweep.add_argument(
        "--max-trials", type=int, default=None, help="stop after this many trials in this call"
    )

    prepare = sub.add_parser(
        "prepare", help="a stage's data preparation alone (tokenize, pack), kept for the training run"
    )
    prepare.add_argument("recipe", help="YAML recipe of a pretrain or sft stage")
    prepare.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    validate = sub.add_parser("validate", help="check recipes and pipelines without training (no network)")
    validate.add_argument("recipes", nargs="+")
    validate.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")

    data = sub.add_parser("data", help="generate built-in data sets")
    data_sub = data.add_subparsers(dest="dataset", required=True)
    tiny = data_sub.add_parser("tinyworld", help="write the synthetic tiny world as jsonl files")
    tiny.add_argument("--out", required=True, help="folder to write (<out>/<part>/<split>.jsonl)")
    tiny.add_argument("--seed", type=int, default=0)

    chat = sub.add_parser("chat", help="chat with a model folder (a run's final/)")
    chat.add_argument("model")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    chat.add_argument("--system", default=None, help="system message")
    _tool_arguments(chat)

    gen = sub.add_parser("generate", help="sample replies to a file of prompts")
    gen.add_argument("model")
    gen.add_argument(
        "--prompts", required=True, help="jsonl/json rows with 'prompt' (text or messages) or 'messages'"
    )
    gen.add_argument("--out", default=None, help="output jsonl (default: <prompts>.generated.jsonl)")
    gen.add_argument("--num-samples", type=int, default=1)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch-size", type=int, default=32)
    _tool_arguments(gen)

    rank = sub.add_parser("rank", help="rank generated samples into comparisons for the reward stage")
    rank.add_argument("samples", help="jsonl from gptpipe generate (several samples per prompt id)")
    by = rank.add_mutually_exclusive_group(required=True)
    by.add_argument(
        "--labeler",
        help="module:function or file.py:function scoring one prompt's samples, e.g. gptpipe.data.tinyworld:label",
    )
    by.add_argument("--rankings", help="jsonl of human rankings: {id, ranking: [sample numbers, best first]}")
    rank.add_argument(
        "--out", default=None, help="output jsonl, ranked format (default: <samples>.ranked.jsonl)"
    )

    score = sub.add_parser("score", help="score with a reward model (a reward run's final/)")
    score.add_argument("model")
    what = score.add_mutually_exclusive_group(required=True)
    what.add_argument("--pairs", help="preference file (json/jsonl): prints pairwise accuracy")
    what.add_argument("--texts", help="jsonl/json rows with 'messages' or 'text': prints one score per row")
    score.add_argument(
        "--format", default=None, help="preference | sharegpt_preference | ranked (default: guessed)"
    )
    score.add_argument("--max-length", type=int, default=None)

    bench = sub.add_parser("eval", help="lm-evaluation-harness tasks on a model folder (a run's final/)")
    bench.add_argument("model")
    bench.add_argument(
        "--tasks", required=True, help="comma-separated: lm-eval tasks, task YAML files or folders, tinyworld"
    )
    bench.add_argument("--num-fewshot", type=int, default=None)
    bench.add_argument("--limit", type=float, default=None, help="examples per task (below 1: a fraction)")
    bench.add_argument("--batch-size", type=int, default=8)
    bench.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="render requests with the model's chat template (default: when its tokenizer has one, except for a "
        "pretraining run's model); --no-chat-template: plain text, base-model style",
    )

    export = sub.add_parser(
        "export", help="a finished model as a plain Hugging Face folder with a model card"
    )
    export.add_argument("source", help="a run folder (e.g. runs/tiny/rl), its final/, or a model folder")
    export.add_argument("--out", required=True, help="the folder to write (appears complete or not at all)")
    export.add_argument("--merge-lora", action="store_true", help="merge a LoRA adapter into its base")
    export.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: as stored")
    export.add_argument(
        "--push-to-hub", metavar="ORG/NAME", default=None, help="upload (HF_TOKEN from the environment)"
    )
    export.add_argument("--private", action="store_true", help="with --push-to-hub: a private repository")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def _launch_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("launching several processes (builds the accelerate launch command)")
    group.add_argument(
        "--launch", metavar="CONFIG", help="accelerate config: multi_gpu, zero2, cpu_ddp... or a file"
    )
    group.add_argument("--gpus", type=int, default=None, help="processes per machine (default: the config's)")
    group.add_argument(
        "--nodes", type=int, default=1, help="machines (run the command on each; see scripts/slurm)"
    )
    group.add_argument("--print-command", action="store_true", help="print the command instead of running it")


def _tool_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tools",
        nargs="+",
        default=[],
        metavar="MOD:FN",
        help="tools the model may call (module:function or file.py:function, typed and documented), run as it calls them",
    )
    parser.add_argument("--max-tool-calls", type=int, default=3, help="rounds of calls before an answer")
    parser.add_argument(
        "--tool-timeout", type=float, default=10.0, help="seconds before a tool call is cut off"
    )


def _toolbox(args) -> tuple:
    """(ToolBox or None, max_tool_calls) from the --tools flags; a tool that cannot be shown is refused."""
    from gptpipe.tools import ToolBox, load_tools

    if not args.tools:
        return None, args.max_tool_calls
    if args.max_tool_calls < 1 or args.tool_timeout <= 0:
        raise UserError("--max-tool-calls must be at least 1 and --tool-timeout above 0")
    return ToolBox(load_tools(args.tools, where="--tools"), args.tool_timeout), args.max_tool_calls


def _relaunch(args, argv: list[str]) -> None:
    """Replace this process with ``accelerate launch ... -m gptpipe <the same command, minus --launch>``."""
    import shlex

    keep, skip = [], False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if skip or name in ("--launch", "--gpus", "--nodes", "--print-command"):
            skip = not skip and name != "--print-command" and "=" not in arg  # a flag's value follows it
            continue
        keep.append(arg)
    gpus = args.gpus or _config_processes(args.launch)
    from gptpipe.distributed import launch_command

    cmd = launch_command(args.launch, gpus, args.nodes, keep)
    if args.print_command:
        print(shlex.join(cmd))
        return
    os.execv(cmd[0], cmd)


def _config_processes(config: str) -> int:
    import yaml

    from gptpipe.distributed import find_config

    return int((yaml.safe_load(find_config(config).read_text()) or {}).get("num_processes", 1))


def run(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides after an option (`pipeline p.yaml --rerun sft sft.learning_rate=1e-4`): argparse ends
    # a positional list at the first option, so those come back unrecognized; they are overrides all the same
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*(args.overrides or []), *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "launch", None):
        return _relaunch(args, argv)
    if args.command == "train":
        from gptpipe.recipe import load_recipe
        from gptpipe.runner import run_stage

        run_stage(load_recipe(args.recipe, args.overrides))
    elif args.command == "prepare":
        from gptpipe.data.prepared import describe
        from gptpipe.recipe import load_recipe

        cfg = load_recipe(args.recipe, args.overrides)
        stage = importlib.import_module(cfg.module)
        if not hasattr(stage, "prepare"):
            raise UserError(
                f"{args.recipe}: stage {cfg.stage} has nothing to prepare ahead (it reads its data when it "
                "starts); gptpipe prepare works for pretrain and sft recipes"
            )
        summary = stage.prepare(cfg)
        print(f"[{cfg.stage}] {summary['folder']}\n{describe(summary)}")
        if summary["reused"]:
            print(f"[{cfg.stage}] (already prepared with the same settings, tokenizer and files)")
    elif args.command == "pipeline":
        from gptpipe.pipeline import run_pipeline

        run_pipeline(args.pipeline, args.overrides, args.rerun, args.output_dir)
    elif args.command == "sweep":
        from gptpipe.sweep import run_sweep

        run_sweep(args.sweep, args.emit, args.max_trials)
    elif args.command == "validate":
        from gptpipe.pipeline import load_pipeline
        from gptpipe.recipe import read_yaml, validate_recipe
        from gptpipe.sweep import validate_sweep

        for recipe in args.recipes:
            if "metric" in read_yaml(Path(recipe)):
                print(f"ok: {recipe} ({validate_sweep(recipe)})")
                continue
            if "stages" in read_yaml(Path(recipe)):
                _, planned = load_pipeline(recipe, args.overrides, check=True)
                print(f"ok: {recipe} (pipeline: {' -> '.join(p.name for p in planned)})")
                continue
            cfg = validate_recipe(recipe, args.overrides)
            print(f"ok: {recipe} (stage {cfg.stage}, output_dir {cfg.output_dir})")
    elif args.command == "chat":
        from gptpipe.replies import chat_loop

        chat_loop(args.model, args.max_new_tokens, args.temperature, args.system, *_toolbox(args))
    elif args.command == "generate":
        from gptpipe.replies import generate_file

        out = args.out or str(Path(args.prompts).with_suffix("")) + ".generated.jsonl"
        n = generate_file(
            args.model,
            args.prompts,
            out,
            args.num_samples,
            args.max_new_tokens,
            args.temperature,
            args.top_p,
            args.seed,
            args.batch_size,
            *_toolbox(args),
        )
        print(f"wrote {n} completions to {out}")
    elif args.command == "rank":
        from gptpipe.data import ranking
        from gptpipe.plugins import import_callable

        labeler = import_callable(args.labeler, "--labeler") if args.labeler else None
        human = ranking.read_rankings(args.rankings) if args.rankings else None
        ranked, stats = ranking.rank_samples(ranking.read_jsonl(args.samples, "samples"), labeler, human)
        out = args.out or str(Path(args.samples).with_suffix("")) + ".ranked.jsonl"
        ranking.write_jsonl(ranked, out)
        print(
            f"{stats['kept']} of {stats['prompts']} prompts ranked ({stats['dropped_fewer_than_two']} all tied, "
            f"{stats['unranked']} unranked), {stats['pairs']} pairs -> {out} (format: ranked)"
        )
    elif args.command == "score":
        import json

        from gptpipe.scoring import score_pairs_file, score_texts_file

        if args.pairs:
            result = score_pairs_file(args.model, args.pairs, args.format, args.max_length)
            print(
                f"{args.pairs}: pairwise accuracy {result['pairwise_accuracy']:.4f}, mean margin "
                f"{result['mean_margin']:.3f} over {result['pairs']} pairs"
            )
        else:
            for row in score_texts_file(args.model, args.texts):
                print(json.dumps(row))
    elif args.command == "eval":
        from gptpipe.benchmarks import evaluate

        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        tasks = [t for t in args.tasks.split(",") if t]
        _, out = evaluate(args.model, tasks, args.num_fewshot, limit, args.batch_size, args.chat_template)
        print(f"scores: {out}")
    elif args.command == "export":
        from gptpipe.export import export

        out = export(
            args.source, args.out, args.merge_lora, args.dtype, args.push_to_hub, args.private, args.overwrite
        )
        print(f"exported {args.source} to {out} (model card: {out / 'README.md'})")
    elif args.command == "data":
        from gptpipe.data import tinyworld

        world = tinyworld.generate(args.seed)
        folder = tinyworld.write(args.out, seed=args.seed, world=world)
        for part, splits in world.items():
            sizes = ", ".join(f"{split} {len(rows)}" for split, rows in splits.items())
            print(f"{folder / part}: {sizes} rows")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors, faults (NaN, full disk, out of memory) and preemption print one message and
    exit with their own code (``gptpipe.errors``), with no traceback."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        run(argv)
    except UserError as e:
        label = "stopped" if isinstance(e, Preempted) else "error"
        print(f"gptpipe: {label}: {e}", file=sys.stderr)
        sys.exit(e.exit_code)  # 2 for input mistakes; the others in gptpipe.errors
    except KeyboardInterrupt:
        print("gptpipe: interrupted", file=sys.stderr)
        sys.exit(130)
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        from gptpipe.faults import describe_oom, is_oom

        if not is_oom(e):
            raise
        error = describe_oom(e)
        print(f"gptpipe: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
