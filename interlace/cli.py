"""Command-line entry points of interlace: ``env`` and ``schedule``."""

from __future__ import annotations

import argparse
import json
import sys
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
    _schedule_parser(commands)
    args = parser.parse_args(argv)
    return _env(args) if args.command == "env" else _schedule(args)


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


def _schedule_parser(commands) -> None:
    p = commands.add_parser("schedule", help="generate, verify and simulate a pipeline schedule; --auto picks one")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--stages", type=int, required=True, help="pipeline ranks p")
    p.add_argument("--microbatches", type=int, default=8, help="m (decode: tokens per sequence)")
    p.add_argument("--chunks", type=int, default=1, help="v stages per rank (interleaved, forward)")
    p.add_argument("--group-size", type=int, default=None, help="microbatches per interleaving group (default: stages)")
    p.add_argument("--training", action="store_true", help="with backward passes (gpipe, 1f1b, interleaved)")
    p.add_argument("--batches", type=int, default=2, help="decode: batches in flight")
    p.add_argument("--stage-time", type=float, default=1e-3, help="one rank's forward per microbatch, seconds")
    p.add_argument("--latency", type=float, default=0.0, help="per transfer, seconds")
    p.add_argument("--bandwidth", type=float, default=float("inf"), help="bytes per second per link")
    p.add_argument("--activation-bytes", type=float, default=0.0, help="bytes per activation message (--auto: per sample)")
    p.add_argument("--trace", default=None, help="write a Chrome trace (open in Perfetto)")
    p.add_argument("--text", action="store_true", help="also print the schedule in its text form")
    p.add_argument("--auto", action="store_true", help="pick chunks and microbatches (decode: batches in flight)")
    p.add_argument("--batch", type=int, default=32, help="--auto: samples (decode: sequences) to process")
    p.add_argument("--sample-time", type=float, default=1e-3, help="--auto: one sample through the whole model, seconds")
    p.add_argument("--overhead", type=float, default=2e-5, help="--auto: fixed cost of every stage forward, seconds")
    p.add_argument("--memory-budget", type=float, default=None, help="--auto: bytes of in-flight activations per rank")
    p.add_argument("--layers", type=int, default=None, help="--auto: model layers (bounds stages x chunks)")


def _schedule(args) -> int:
    from interlace.engine.pipeline import Costs, generate, simulate, verify
    from interlace.engine.pipeline import plan

    if args.auto:
        work = plan.Workload(batch=args.batch, sample_time=args.sample_time, overhead=args.overhead,
                             activation_bytes=args.activation_bytes, latency=args.latency, bandwidth=args.bandwidth,
                             steps=args.microbatches)  # fmt: skip
        best, candidates = plan.auto(args.kind if args.kind == "decode" else "forward", args.stages, work, args.memory_budget,
                                     layers=args.layers)  # fmt: skip
        print(plan.explain(best, candidates, args.kind, args.memory_budget))
        schedule, sim = best.schedule, best.sim
    else:
        schedule = generate(args.kind, args.stages, args.microbatches, args.chunks, group_size=args.group_size,
                            training=args.training, batches=args.batches)  # fmt: skip
        verify(schedule)
        links = dict(latency=args.latency, bandwidth=args.bandwidth, message_bytes=args.activation_bytes)
        sim = simulate(schedule, Costs.uniform(schedule, args.stage_time, **links))
    print(plan.describe(schedule, sim))
    print(plan.grid(schedule, sim))
    if args.text:
        print(schedule, end="")
    if args.trace:
        sim.trace(args.trace)
        print(f"wrote {args.trace} (open it in https://ui.perfetto.dev)")
    return 0
