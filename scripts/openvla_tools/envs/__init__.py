"""Simulated environments for demonstrations and closed-loop evaluation: the built-in 2-D tabletop (`tabletop`) and
Meta-World (`metaworld_env`, an optional extra)."""

import argparse
from collections.abc import Callable, Sequence

ENVIRONMENTS = ("tabletop", "metaworld")


def run_for_env(argv: Sequence[str] | None, description: str, mains: dict[str, Callable[[Sequence[str]], None]]) -> None:
    """The command line of a program with `--env tabletop|metaworld` (default tabletop): `--env` picks the function
    of `mains` that parses the remaining arguments. `--help` without `--env` shows the choice."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    parser.add_argument("--env", choices=list(mains), default=None, help="Environment (default: tabletop).")
    args, rest = parser.parse_known_args(argv)
    if args.env is None and {"-h", "--help"} & set(rest):
        parser.print_help()
        return
    mains[args.env or "tabletop"](rest)
