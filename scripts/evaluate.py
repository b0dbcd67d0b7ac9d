"""Closed-loop evaluation of a saved OpenVLA model, the scripted expert or random actions, on held-out episodes.

    python scripts/evaluate.py --env tabletop --model outputs/finetune --episodes 100 --json outputs/eval.json
    python scripts/evaluate.py --env metaworld --model outputs/metaworld --tasks button-press-topdown-v3 \\
        drawer-close-v3 coffee-button-v3 --episodes-per-task 50 --camera topview --json outputs/metaworld_eval.json

`--env` picks the environment (default `tabletop`); the other options are the environment's own (`--env ENV --help`
lists them). Models load through the Auto classes (`trust_remote_code=True`, offline). Tabletop: episodes run in
lock-step batches (one batched `predict_action` call per step) and the table shows the scripted expert's and a random
policy's success beside the model's. Meta-World (the `metaworld` extra): `openvla_tools.metaworld_evaluation` says
how variations, chunks and baselines are run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from openvla_tools.envs import run_for_env
from openvla_tools.envs.tabletop import (
    TASK_KINDS,
    ModelPolicy,
    evaluate_model,
    evaluate_policy,
    expert_policy,
    random_policy,
)
from processing_openvla import resolve_unnorm_key


def tabletop_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="evaluate.py --env tabletop", description="Closed-loop success on held-out tabletop episodes.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Saved model folder or Hub id.")
    source.add_argument("--server", help="URL of a model served by scripts/serve.py (the `serve` extra).")
    parser.add_argument("--api_key", default=None, help="The server's API key, if it has one.")
    parser.add_argument("--episodes", type=int, default=100, help="Held-out episodes.")
    parser.add_argument("--seed", type=int, default=10_000, help="Seed of the first held-out episode.")
    parser.add_argument("--unnorm_key", default=None, help="Dataset whose action statistics to use.")
    parser.add_argument("--batch_size", type=int, default=50, help="Episodes stepped together.")
    parser.add_argument("--json", type=Path, default=None, help="Write the results here.")
    parser.add_argument("--strip", type=Path, default=None, help="Write a PNG strip of a few episodes here.")
    parser.add_argument("--tasks", nargs="+", choices=TASK_KINDS, default=list(TASK_KINDS), help="Goal kinds of the episodes.")
    args = parser.parse_args(argv)

    if args.server is not None:
        from openvla_tools.remote_policy import RemotePolicy

        served = ModelPolicy(RemotePolicy(args.server, api_key=args.api_key, unnorm_key=args.unnorm_key, n_action_steps=1))
        evaluated = evaluate_policy(served, args.episodes, seed=args.seed, batch_size=args.batch_size,
                                    strip_path=args.strip, task_kinds=args.tasks)
        unnorm_key = args.unnorm_key  # None: the server's default dataset
    else:
        from transformers import AutoModel, AutoProcessor

        model = AutoModel.from_pretrained(args.model, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
        evaluated = evaluate_model(model, processor, args.episodes, args.seed, args.unnorm_key, args.batch_size, args.strip, args.tasks)
        unnorm_key = resolve_unnorm_key(model.config.norm_stats, args.unnorm_key)
    results = {
        "model": evaluated,
        "expert": evaluate_policy(expert_policy, args.episodes, seed=args.seed, task_kinds=args.tasks),
        "random": evaluate_policy(random_policy(0), args.episodes, seed=args.seed, task_kinds=args.tasks),
    }
    print(f"model: {args.model or args.server}, action statistics of dataset (unnorm_key): {unnorm_key}")
    print(f"{'policy':<8} {'success':>8} {'mean steps':>11}")
    for name, result in results.items():
        print(f"{name:<8} {result['success_rate']:>8.1%} {result['mean_steps']:>11.1f}")
    if args.json:
        summary = {name: {k: v for k, v in result.items() if k != "successes"} for name, result in results.items()}
        summary["settings"] = {"model": args.model or args.server, "unnorm_key": unnorm_key, "episodes": args.episodes, "seed": args.seed}
        args.json.write_text(json.dumps(summary, indent=2))


def metaworld_main(argv: Sequence[str]) -> None:
    from openvla_tools.envs.metaworld_env import (
        DEFAULT_CAMERA,
        DEFAULT_IMAGE_SIZE,
        DEFAULT_MAX_STEPS,
        EVAL_SEED,
        KNOWN_TASKS,
        check_tasks,
    )
    from openvla_tools.metaworld_evaluation import (
        BASELINES,
        evaluate_policy_on_tasks,
        policy_factory,
        print_table,
        save_plot,
    )

    parser = argparse.ArgumentParser(prog="evaluate.py --env metaworld", description="Closed-loop success on held-out Meta-World variations (openvla_tools.metaworld_evaluation).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Saved model folder or Hub id, or 'scripted' or 'random'.")
    source.add_argument("--server", help="URL of a model served by scripts/serve.py (the `serve` extra).")
    parser.add_argument("--api-key", default=None, help="The server's API key, if it has one.")
    parser.add_argument("--tasks", nargs="+", required=True, help=f"Meta-World tasks, from {list(KNOWN_TASKS)}.")
    parser.add_argument("--episodes-per-task", type=int, required=True, help="Held-out episodes per task.")
    parser.add_argument("--json", type=Path, required=True, help="Write the results here.")
    parser.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS, help="Steps per episode at most.")
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="Side of the square frames.")
    parser.add_argument("--camera", default=DEFAULT_CAMERA, help="Meta-World camera name.")
    parser.add_argument("--plot", type=Path, default=None, help="Write a bar plot (PNG) here.")
    parser.add_argument("--strip", type=Path, default=None, help="Write the first episode of each task here (.png or .gif).")
    parser.add_argument("--unnorm-key", default=None, help="Dataset whose action statistics unnormalise the model's actions.")
    parser.add_argument(
        "--n-action-steps", type=int, default=None,
        help="Actions of each predicted chunk executed before the model is queried again (1..chunk size; default: the "
        "whole chunk).",
    )
    parser.add_argument(
        "--temporal-ensemble-coeff", type=float, default=None,
        help="Query the model at every step and execute the weighted mean of the overlapping chunks' actions for that "
        "step, weight exp(-coeff * i) for the i-th oldest (ACT's temporal ensembling; 0 = plain mean).",
    )
    parser.add_argument("--no-baselines", action="store_true", help="Do not run the random and scripted baselines.")
    args = parser.parse_args(argv)

    check_tasks(args.tasks)  # before a model loads
    label = args.model if args.model in BASELINES else "model"
    settings = {"tasks": args.tasks, "episodes_per_task": args.episodes_per_task, "max_steps": args.max_steps,
                "image_size": args.image_size, "camera_name": args.camera}
    policy_options = {"n_action_steps": args.n_action_steps, "temporal_ensemble_coeff": args.temporal_ensemble_coeff}
    factory = policy_factory(args.model, args.unnorm_key, args.server, args.api_key, **policy_options)
    results = {label: evaluate_policy_on_tasks(factory, strip_path=args.strip, desc=label, **settings)}
    if not args.no_baselines:
        for name, baseline in BASELINES.items():
            if name != label:
                results[name] = evaluate_policy_on_tasks(baseline, desc=name, **settings)
    print_table(results)

    summary = {
        "policy": args.model or args.server,
        **results[label],
        "settings": {**settings, "variation_seed": EVAL_SEED, "unnorm_key": args.unnorm_key, **policy_options},
        "baselines": {name: result for name, result in results.items() if name != label},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2))
    if args.plot is not None:
        save_plot(results, args.plot)


def main(argv: Sequence[str] | None = None) -> None:
    run_for_env(argv, __doc__, {"tabletop": tabletop_main, "metaworld": metaworld_main})

if __name__ == "__main__":
    main()
