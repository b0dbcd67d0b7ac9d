"""Closed-loop evaluation of a saved OpenVLA model, a served one, the scripted expert or random actions, on held-out
episodes of either environment.

    python scripts/evaluate.py --env tabletop --model outputs/finetune --episodes 100 --json outputs/eval.json
    python scripts/evaluate.py --env metaworld --model outputs/metaworld --tasks button-press-topdown-v3 \\
        drawer-close-v3 coffee-button-v3 --episodes-per-task 50 --camera topview --json outputs/metaworld_eval.json

`--env` picks the environment (default `tabletop`; `metaworld` needs the `metaworld` extra); `--env ENV --help` lists
its options. `--model` is a saved model folder or Hub id (loaded through the Auto classes, `trust_remote_code=True`),
or `scripted` / `random`; `--server URL` evaluates a model served by `scripts/serve.py` instead. Every policy acts
through the same batched interface (`openvla_tools.evaluation.Policy`): episodes run in lock-step batches of
`--batch_size` environments, one policy call per step, and a model executes `--n_action_steps` actions of each chunk
(default: all) before re-planning. Unless `--no_baselines`, the scripted expert and random actions run on the same
episodes. The program prints the success per task (tabletop: goal kind) of each policy, writes `--json`, and with
`--strip PATH` a picture of the first episodes there and a rollout video (GIF) per task next to it, `STEM_TASK.gif`.

`--open_loop` replays recorded episodes of a dataset through a saved model instead, its actions against the recorded
ones, training and held-out episodes side by side (`openvla_tools.open_loop`; `--open_loop --help` lists its options):

    python scripts/evaluate.py --open_loop --model outputs/finetune --out outputs/open_loop
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from openvla_tools.envs import run_for_env
from openvla_tools.evaluation import load_policy, print_table, statistics_key


def build_parser(env: str) -> argparse.ArgumentParser:
    """The options of `evaluate.py --env ENV`: the policy's, the run's, then the environment's own."""
    parser = argparse.ArgumentParser(prog=f"evaluate.py --env {env}", description=f"Closed-loop success on held-out {env} episodes.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Saved model folder or Hub id, or 'scripted' or 'random'.")
    source.add_argument("--server", help="URL of a model served by scripts/serve.py (the `serve` extra).")
    parser.add_argument(
        "--adapter", default=None,
        help="PEFT adapter folder or Hub id (finetune.py --use_lora writes OUTPUT/adapter) to load on --model and evaluate; "
        "give --unnorm_key when the model then holds statistics of several datasets.",
    )
    parser.add_argument("--api_key", "--api-key", default=None, help="The server's API key, if it has one.")
    parser.add_argument("--unnorm_key", "--unnorm-key", default=None, help="Dataset whose action statistics unnormalise the model's actions.")
    parser.add_argument(
        "--n_action_steps", "--n-action-steps", type=int, default=None,
        help="Actions of each predicted chunk executed before the model is queried again (1..chunk size; default: the "
        "whole chunk).",
    )
    parser.add_argument(
        "--temporal_ensemble_coeff", "--temporal-ensemble-coeff", type=float, default=None,
        help="Query the model at every step and execute the weighted mean of the overlapping chunks' actions for that "
        "step, weight exp(-coeff * i) for the i-th oldest (ACT's temporal ensembling; 0 = plain mean).",
    )
    parser.add_argument("--batch_size", "--batch-size", type=int, default=None, help="Environments stepped together (tabletop default 50, metaworld 10).")
    parser.add_argument("--no_baselines", "--no-baselines", action="store_true", help="Do not run the scripted and random baselines.")
    parser.add_argument("--json", type=Path, default=None, help="Write the results here.")
    parser.add_argument(
        "--strip", type=Path, default=None,
        help="Write a picture of the first episodes here (PNG; metaworld also .gif), and a rollout video per task next to it (STEM_TASK.gif).",
    )
    if env == "tabletop":
        from openvla_tools.envs.tabletop import TASK_KINDS

        parser.add_argument("--episodes", type=int, default=100, help="Held-out episodes.")
        parser.add_argument("--seed", type=int, default=10_000, help="Seed of the first held-out episode.")
        parser.add_argument("--tasks", nargs="+", choices=TASK_KINDS, default=list(TASK_KINDS), help="Goal kinds of the episodes.")
    else:
        from openvla_tools.envs.metaworld_env import DEFAULT_CAMERA, DEFAULT_IMAGE_SIZE, DEFAULT_MAX_STEPS, KNOWN_TASKS

        parser.add_argument("--tasks", nargs="+", required=True, help=f"Meta-World tasks, from {list(KNOWN_TASKS)}, or mt10 (its ten tasks).")
        parser.add_argument("--episodes-per-task", "--episodes_per_task", type=int, required=True, help="Held-out episodes per task.")
        parser.add_argument("--max-steps", "--max_steps", type=int, default=DEFAULT_MAX_STEPS, help="Steps per episode at most.")
        parser.add_argument("--image-size", "--image_size", type=int, default=DEFAULT_IMAGE_SIZE, help="Side of the square frames.")
        parser.add_argument("--camera", default=DEFAULT_CAMERA, help="Meta-World camera name.")
        parser.add_argument("--plot", type=Path, default=None, help="Write a bar plot (PNG) here.")
        parser.add_argument(
            "--wrong-instructions", "--wrong_instructions", action="store_true",
            help="Give each task the instruction of the next task in --tasks: a model that reads the instruction fails.",
        )
    return parser


def policy_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"n_action_steps": args.n_action_steps, "temporal_ensemble_coeff": args.temporal_ensemble_coeff, "adapter": args.adapter}


TABLETOP_JSON_NAMES = {"scripted": "expert"}  # the key of the scripted expert's results in the tabletop JSON


def evaluate_tabletop(args: argparse.Namespace) -> dict[str, Any]:
    """The evaluated policy (JSON key `model`), then the baselines `expert` and `random`, on the same episodes."""
    from openvla_tools.envs.tabletop import ACTION_DIM, BASELINES, evaluate_policy

    policy = load_policy(args.model, BASELINES, ACTION_DIM, "tabletop", args.server, args.api_key, args.unnorm_key, **policy_options(args))
    unnorm_key = statistics_key(policy, args.unnorm_key)
    episodes = {"seed": args.seed, "task_kinds": args.tasks, "batch_size": args.batch_size or 50}
    results = {"model": evaluate_policy(policy, args.episodes, strip_path=args.strip, **episodes)}
    if not args.no_baselines:
        for name, baseline in BASELINES.items():
            if name != args.model:
                results[TABLETOP_JSON_NAMES.get(name, name)] = evaluate_policy(baseline(), args.episodes, **episodes)
    print(f"model: {args.model or args.server}, action statistics of dataset (unnorm_key): {unnorm_key}")
    print_table({name: {**result["task_success"], "all": result["success_rate"]} for name, result in results.items()})
    summary: dict[str, Any] = {name: {k: v for k, v in result.items() if k != "successes"} for name, result in results.items()}
    summary["settings"] = {"model": args.model or args.server, "unnorm_key": unnorm_key, "episodes": args.episodes, "seed": args.seed,
                           **policy_options(args)}
    return summary


def evaluate_metaworld(args: argparse.Namespace) -> dict[str, Any]:
    """The evaluated policy at the top level, the baselines `random` and `scripted` under `baselines`."""
    from openvla_tools.envs.metaworld_env import ACTION_DIM, BASELINES, EVAL_SEED, check_tasks
    from openvla_tools.metaworld_evaluation import DEFAULT_BATCH_SIZE, evaluate_policy_on_tasks, save_plot

    args.tasks = check_tasks(args.tasks)  # before a model loads
    policy = load_policy(args.model, BASELINES, ACTION_DIM, "metaworld", args.server, args.api_key, args.unnorm_key, **policy_options(args))
    label = args.model if args.model in BASELINES else "model"
    settings = {"tasks": args.tasks, "episodes_per_task": args.episodes_per_task, "max_steps": args.max_steps,
                "image_size": args.image_size, "camera_name": args.camera, "batch_size": args.batch_size or DEFAULT_BATCH_SIZE,
                "wrong_instructions": args.wrong_instructions}
    results = {label: evaluate_policy_on_tasks(policy, strip_path=args.strip, desc=label, **settings)}
    if not args.no_baselines:
        for name, baseline in BASELINES.items():
            if name != label:
                results[name] = evaluate_policy_on_tasks(baseline(), desc=name, **settings)
    print_table({name: {**result["success"], "mean": result["mean_success"]} for name, result in results.items()})
    if args.plot is not None:
        save_plot(results, args.plot)
    return {
        "policy": args.model or args.server,
        **results[label],
        "settings": {**settings, "variation_seed": EVAL_SEED, "unnorm_key": statistics_key(policy, args.unnorm_key), **policy_options(args)},
        "baselines": {name: result for name, result in results.items() if name != label},
    }


EVALUATIONS = {"tabletop": evaluate_tabletop, "metaworld": evaluate_metaworld}


def env_main(env: str, argv: Sequence[str]) -> None:
    args = build_parser(env).parse_args(argv)
    summary = EVALUATIONS[env](args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))


def open_loop_main(argv: Sequence[str]) -> None:
    """`--open_loop`: a saved model fed the recorded frames of episodes, its actions against the recorded ones
    (`openvla_tools.open_loop`); the data is read and split into training and held-out episodes as finetune.py does."""
    from finetune import DataArguments, load_training_data, split_dataset
    from transformers import AutoModel, AutoProcessor

    from openvla_tools.lerobot_format import parse_episodes
    from openvla_tools.open_loop import MIN_VERDICT_FRAMES, first_episodes, metrics_table, run_open_loop

    parser = argparse.ArgumentParser(prog="evaluate.py --open_loop", description=open_loop_main.__doc__)
    parser.add_argument("--model", required=True, help="Saved model folder or Hub id.")
    parser.add_argument("--dataset_name", default=None, help="finetune.py's --dataset_name (default: the built-in tabletop demos).")
    parser.add_argument("--image_key", default=None, help="LeRobot camera (default: the only one).")
    parser.add_argument("--episodes", default=None, help="Episodes to replay, e.g. '0-2,17' (default: the first training and held-out episodes, enough of each for --min_verdict_frames).")
    parser.add_argument("--eval_split_ratio", type=float, default=0.05, help="finetune.py's held-out share, which with --seed says which episodes were held out.")
    parser.add_argument("--seed", type=int, default=42, help="finetune.py's --seed.")
    parser.add_argument("--num_demo_episodes", type=int, default=4000, help="finetune.py's --num_demo_episodes (built-in demos).")
    parser.add_argument("--demo_tasks", default="reach,push", help="finetune.py's --demo_tasks (built-in demos).")
    parser.add_argument("--unnorm_key", default=None, help="Dataset whose action statistics to use.")
    parser.add_argument("--out", type=Path, default=Path("outputs/open_loop"), help="Folder for the plots, report.md and metrics.json.")
    parser.add_argument("--min_verdict_frames", type=int, default=MIN_VERDICT_FRAMES,
                        help="Replayed frames a split needs for an under-fit / over-fit verdict (fewer: no verdict).")
    args = parser.parse_args(argv)
    data_args = DataArguments(dataset_name=args.dataset_name, image_key=args.image_key, eval_split_ratio=args.eval_split_ratio,
                              num_demo_episodes=args.num_demo_episodes, demo_tasks=args.demo_tasks)
    rows, data_args = load_training_data(data_args, args.seed, args.demo_tasks.split(","))
    columns = {name: getattr(data_args, name) for name in ("image_column", "instruction_column", "action_column", "episode_column")}
    if data_args.episode_column not in rows.column_names:
        raise ValueError(f"Open-loop replay needs episodes; the dataset has no {data_args.episode_column!r} column (its columns: {rows.column_names}).")
    train_rows, held_out_rows = split_dataset(rows, data_args, args.seed)
    held_out = sorted(set(held_out_rows[data_args.episode_column])) if held_out_rows is not None else []
    episodes = parse_episodes(args.episodes) or [
        *first_episodes(train_rows, data_args.episode_column, args.min_verdict_frames),
        *(first_episodes(held_out_rows, data_args.episode_column, args.min_verdict_frames) if held_out else []),
    ]
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    splits = {episode: "held-out" if episode in held_out else "training" for episode in episodes}
    metrics, verdict = run_open_loop(model, processor, rows, splits, args.out, args.unnorm_key, f"{args.model} on {args.dataset_name or 'the built-in demos'}",
                                    min_verdict_frames=args.min_verdict_frames, **columns)
    print(metrics_table(metrics))
    print(f"Verdict: {verdict}\nPlots and report: {args.out}")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--open_loop" in argv:
        open_loop_main([arg for arg in argv if arg != "--open_loop"])
        return
    run_for_env(argv, __doc__, {env: functools.partial(env_main, env) for env in EVALUATIONS})


if __name__ == "__main__":
    main()
