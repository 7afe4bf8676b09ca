"""`python -m bench <benchmark>`: run a benchmark, print its table, write its JSON.

`python -m bench demo` runs every benchmark the hardware supports with default settings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import collectives
from .common import parse_bytes, write_result


def _collectives_parser(commands) -> None:
    p = commands.add_parser("collectives", help="nccl-tests style bandwidth of every collective and transport")
    p.add_argument("--backends", default="local,gloo,nccl", help="comma list of local, gloo, nccl (unavailable ones are skipped, with the reason)")
    p.add_argument("--world-sizes", default="2", help="comma list, e.g. 2,4")
    p.add_argument("--collectives", default=",".join(collectives.COLLECTIVES))
    p.add_argument("--min-bytes", default="4K")
    p.add_argument("--max-bytes", default=None, help="default 16M on CPU, 256M with a GPU")
    p.add_argument("--step", type=int, default=4, help="size multiplier between points")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--check", action="store_true", help="keep DistGroup's cross-rank signature checks on (measures their cost)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/out/collectives-<time>.json)")


def _collectives_config(args) -> collectives.Config:
    import torch

    max_bytes = args.max_bytes or ("256M" if torch.cuda.is_available() else "16M")
    return collectives.Config(
        backends=_list(args.backends),
        world_sizes=[int(w) for w in _list(args.world_sizes)],
        collectives=_list(args.collectives),
        min_bytes=parse_bytes(args.min_bytes),
        max_bytes=parse_bytes(max_bytes),
        step=args.step,
        dtype=args.dtype,
        check=args.check,
    )


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def run_collectives(config: collectives.Config, out: Path | None) -> Path:
    print("collectives: measuring (rank processes start in about a second)...", file=sys.stderr, flush=True)
    result = collectives.run(config)
    print(collectives.table(result))
    path = write_result("collectives", result["config"], result["rows"], out, skipped=result["skipped"], copy_GBps=result["copy_GBps"])
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _collectives_parser(commands)
    commands.add_parser("demo", help="every benchmark this hardware supports, default settings")
    args = parser.parse_args(argv)
    if args.command == "collectives":
        run_collectives(_collectives_config(args), args.out)
    else:
        run_collectives(_collectives_config(parser.parse_args(["collectives"])), None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
