"""``trace-ray`` command line: one subcommand per stage, each a thin layer over the library.

Each module in ``trace_ray.commands`` exposes ``register(subparsers)``, which adds its parser and
sets ``func(args) -> int``. Heavy imports happen inside ``func``, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Order = order in --help.
COMMANDS = ["triage", "realign", "evaluate", "report", "demo", "serve"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trace-ray",
        description=(
            "Re-align a deployed LLM to a new policy with the preference data it was aligned on "
            "(TRACE: triage, hybrid objectives, alignment-impact weights) on Ray."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from trace_ray import __version__

    parser.add_argument("--version", action="version", version=f"trace-ray {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"trace_ray.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"trace_ray.commands.{name}":
                continue  # subcommand not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from trace_ray.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"trace-ray {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"trace-ray {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
