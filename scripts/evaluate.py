"""Closed-loop evaluation of a saved OpenVLA model on held-out episodes of the built-in tabletop task.

    python scripts/evaluate.py --model outputs/finetune --episodes 100 --json outputs/eval.json --strip outputs/eval.png

Loads the model and processor through the Auto classes (`trust_remote_code=True`, works offline), runs the episodes
in lock-step batches (one batched `predict_action` call per step), and prints the success rate next to the scripted
expert's and a random policy's.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tabletop import TASK_KINDS, evaluate_policy, expert_policy, random_policy  # noqa: E402

from modeling_openvla import OpenVLAPolicy  # noqa: E402


class ModelPolicy:
    """`policy(images, instructions) -> [B, action_dim]` for `evaluate_policy`, whose batch shrinks as episodes end:
    an `OpenVLAPolicy` that re-plans at every step (the first action of a chunk is executed)."""

    def __init__(self, model, processor, unnorm_key: str | None = None):
        self.policy = OpenVLAPolicy(model.eval(), processor, unnorm_key, n_action_steps=1)

    def __call__(self, images: list, instructions: list[str]) -> np.ndarray:
        self.policy.reset()
        return self.policy.select_actions(images, instructions)


@torch.no_grad()
def evaluate_model(model, processor, num_episodes: int = 100, seed: int = 10_000, unnorm_key: str | None = None,
                   batch_size: int | None = 50, strip_path: Path | None = None,
                   task_kinds: Sequence[str] = TASK_KINDS) -> dict[str, Any]:
    """Success rate of `model` on `num_episodes` held-out tabletop episodes (seeds `seed`, `seed + 1`, ...) whose goals
    are of `task_kinds`."""
    return evaluate_policy(ModelPolicy(model, processor, unnorm_key), num_episodes, seed=seed, batch_size=batch_size,
                           strip_path=strip_path, task_kinds=task_kinds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Saved model folder or Hub id.")
    parser.add_argument("--episodes", type=int, default=100, help="Held-out episodes.")
    parser.add_argument("--seed", type=int, default=10_000, help="Seed of the first held-out episode.")
    parser.add_argument("--unnorm_key", default=None, help="Dataset whose action statistics to use.")
    parser.add_argument("--batch_size", type=int, default=50, help="Episodes stepped together.")
    parser.add_argument("--json", type=Path, default=None, help="Write the results here.")
    parser.add_argument("--strip", type=Path, default=None, help="Write a PNG strip of a few episodes here.")
    parser.add_argument("--tasks", nargs="+", choices=TASK_KINDS, default=list(TASK_KINDS), help="Goal kinds of the episodes.")
    args = parser.parse_args()

    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(args.model, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    results = {
        "model": evaluate_model(model, processor, args.episodes, args.seed, args.unnorm_key, args.batch_size, args.strip, args.tasks),
        "expert": evaluate_policy(expert_policy, args.episodes, seed=args.seed, task_kinds=args.tasks),
        "random": evaluate_policy(random_policy(0), args.episodes, seed=args.seed, task_kinds=args.tasks),
    }
    print(f"{'policy':<8} {'success':>8} {'mean steps':>11}")
    for name, result in results.items():
        print(f"{name:<8} {result['success_rate']:>8.1%} {result['mean_steps']:>11.1f}")
    if args.json:
        summary = {name: {k: v for k, v in result.items() if k != "successes"} for name, result in results.items()}
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
