"""Command-line entry points of interlace."""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m interlace", description="interlace command line")
    commands = parser.add_subparsers(dest="command", required=True)
    env = commands.add_parser("env", help="versions, commit, GPUs and topology: the envelope of every result")
    env.add_argument("--json", action="store_true", help="print the envelope as JSON")
    args = parser.parse_args(argv)
    return _env(args.json)


def _env(as_json: bool) -> int:
    from interlace.engine.telemetry import envelope, format_envelope

    env = envelope()
    print(json.dumps(env, indent=2) if as_json else format_envelope(env))
    return 0
