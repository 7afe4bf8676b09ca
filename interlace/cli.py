"""Command-line entry points of interlace: ``env`` and ``schedule``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from interlace.engine.pipeline.generators import KINDS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m interlace", description="interlace command line")
    commands = parser.add_subparsers(dest="command", required=True)
    env = commands.add_parser("env", help="versions, commit, GPUs and topology: the envelope of every result")
    env.add_argument("--json", action="store_true", help="print the envelope as JSON")
    env.add_argument("--out", default=None, help="also write the envelope as JSON to this file")
    env.add_argument("--require-gpu", action="store_true",
                     help="exit 1, saying why, unless torch sees a CUDA GPU and interlace._C was built with CUDA")  # fmt: skip
    schedule = _schedule_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "env":
        return _env(args)
    if conflict := _auto_conflict(args):
        schedule.error(conflict)
    return _schedule(args, schedule.error)


def _env(args) -> int:
    from interlace.engine.telemetry import envelope, format_envelope

    env = envelope()
    print(json.dumps(env, indent=2) if args.json else format_envelope(env))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(env, indent=2) + "\n")
    missing = gpu_missing(env) if args.require_gpu else None
    if missing:
        print(f"interlace env --require-gpu: {missing}", file=sys.stderr)
        return 1
    return 0


def gpu_missing(env: dict) -> str | None:
    """Why the envelope's machine cannot run interlace's GPU paths, or None."""
    ext = env["extension"]
    if not env["cuda"]["available"]:
        return f"torch sees no CUDA GPU (torch built with CUDA {env['cuda']['torch_cuda'] or 'none'}; {env['gpu_status']})"
    if not ext["loaded"]:
        return f"interlace._C does not load: {ext['error']}"
    if not ext["cuda"]:
        return "interlace._C was built without CUDA (rebuild with INTERLACE_CUDA=ON where nvcc is found)"
    return None


def _schedule_parser(commands) -> argparse.ArgumentParser:
    p = commands.add_parser("schedule", help="generate, verify and simulate a pipeline schedule; --auto picks one")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--stages", type=int, required=True, help="pipeline ranks p")
    d = SCHEDULE_DEFAULTS
    p.add_argument("--microbatches", type=int, default=None, help=f"m (decode: tokens per sequence); default {d['microbatches']}")
    p.add_argument("--chunks", type=int, default=None, help=f"v stages per rank (interleaved, forward; default {d['chunks']})")
    p.add_argument("--group-size", type=int, default=None, help="microbatches per interleaving group (default: stages)")
    p.add_argument("--training", action="store_true", help="with backward passes (gpipe, 1f1b, interleaved)")
    p.add_argument("--batches", type=int, default=None, help=f"decode: batches in flight (default {d['batches']})")
    p.add_argument("--stage-time", type=float, default=None, help=f"one rank's forward per microbatch, seconds (default {d['stage_time']})")
    p.add_argument("--latency", type=float, default=0.0, help="per transfer, seconds")
    p.add_argument("--bandwidth", type=float, default=float("inf"), help="bytes per second per link")
    p.add_argument("--activation-bytes", type=float, default=0.0, help="bytes per activation message (--auto: per sample)")
    p.add_argument("--trace", default=None, help="write a Chrome trace (open in Perfetto)")
    p.add_argument("--text", action="store_true", help="also print the schedule in its text form")
    p.add_argument("--auto", action="store_true", help="pick chunks and microbatches (decode: batches in flight)")
    p.add_argument("--batch", type=int, default=None, help=f"--auto: samples (decode: sequences) to process (default {d['batch']})")
    p.add_argument("--sample-time", type=float, default=None, help=f"--auto: one sample through the whole model, seconds (default {d['sample_time']})")
    p.add_argument("--overhead", type=float, default=None, help=f"--auto: fixed cost of every stage forward, seconds (default {d['overhead']})")
    p.add_argument("--memory-budget", type=float, default=None, help="--auto: bytes of in-flight activations per rank")
    p.add_argument("--layers", type=int, default=None, help="--auto: model layers (bounds stages x chunks)")
    return p


SCHEDULE_DEFAULTS = {"microbatches": 8, "chunks": 1, "batches": 2, "stage_time": 1e-3, "batch": 32, "sample_time": 1e-3, "overhead": 2e-5}
AUTO_PICKS = {"chunks": "--chunks", "batches": "--batches", "group_size": "--group-size", "stage_time": "--stage-time"}
AUTO_ONLY = {"batch": "--batch", "sample_time": "--sample-time", "overhead": "--overhead", "memory_budget": "--memory-budget",
             "layers": "--layers"}  # fmt: skip


def _given(args, name: str):
    """The option as given, or its default: defaults are None in the parser, so that what was
    given can be told apart (``_auto_conflict``)."""
    value = getattr(args, name)
    return SCHEDULE_DEFAULTS[name] if value is None else value


def _auto_conflict(args) -> str | None:
    """Why these options cannot go with (or without) --auto, or None. --auto plans inference
    schedules and chooses what --chunks and the like would fix; --batch and the like describe the
    work it plans for. (Options a kind does not take are refused by ``generate``.)"""
    if not args.auto:
        given = [flag for name, flag in AUTO_ONLY.items() if getattr(args, name) is not None]
        return f"{', '.join(given)}: only with --auto (the work it plans for)" if given else None
    if args.kind not in ("forward", "decode"):
        return f"--auto plans inference schedules: --kind forward (interleaved chunks) or decode, got --kind {args.kind}"
    if args.training:
        return "--auto plans inference schedules: --training is not supported with it"
    given = [flag for name, flag in AUTO_PICKS.items() if getattr(args, name) is not None]
    if args.kind == "forward" and args.microbatches is not None:  # decode reads it as tokens per sequence
        given.insert(0, "--microbatches")
    if given:
        return f"--auto chooses the schedule from --batch, --sample-time and --overhead: drop {', '.join(given)}"
    return None


def _schedule(args, refuse: Callable[[str], None]) -> int:
    """``refuse``: the parser's error, for parameters ``plan.auto`` or ``generate`` reject."""
    from interlace.engine.pipeline import Costs, generate, simulate, verify
    from interlace.engine.pipeline import plan

    if args.auto:
        work = plan.Workload(batch=_given(args, "batch"), sample_time=_given(args, "sample_time"), overhead=_given(args, "overhead"),
                             activation_bytes=args.activation_bytes, latency=args.latency, bandwidth=args.bandwidth,
                             steps=_given(args, "microbatches"))  # fmt: skip
        try:
            best, candidates = plan.auto(args.kind, args.stages, work, args.memory_budget, layers=args.layers)
        except ValueError as error:
            refuse(str(error))
        print(plan.explain(best, candidates, args.kind, args.memory_budget))
        schedule, sim = best.schedule, best.sim
    else:
        batches = _given(args, "batches") if args.kind == "decode" else args.batches  # other kinds refuse it if given
        try:
            schedule = generate(args.kind, args.stages, _given(args, "microbatches"), _given(args, "chunks"), group_size=args.group_size,
                                training=args.training, batches=batches)  # fmt: skip
        except ValueError as error:
            refuse(str(error))
        verify(schedule)
        links = dict(latency=args.latency, bandwidth=args.bandwidth, message_bytes=args.activation_bytes)
        sim = simulate(schedule, Costs.uniform(schedule, _given(args, "stage_time"), **links))
    print(plan.describe(schedule, sim))
    print(plan.grid(schedule, sim))
    if args.text:
        print(schedule, end="")
    if args.trace:
        sim.trace(args.trace)
        print(f"wrote {args.trace} (open it in https://ui.perfetto.dev)")
    return 0
