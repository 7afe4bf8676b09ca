"""`python -m bench <benchmark>`: run a benchmark, print its table, write its JSON.

`python -m bench demo` runs every benchmark the hardware supports with default settings.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")  # rank streams must not share hardware queues (README)

import torch  # noqa: E402

from interlace.engine.telemetry import envelope  # noqa: E402

from . import collectives, decode, gemm, layers, pipeline, rank_slice, report
from .common import StuckStream, parse_bytes, result_path, write_result

GPU = torch.cuda.is_available()
BACKENDS_HELP = f"comma list of {', '.join(collectives.BACKENDS)} (unavailable ones are skipped, with the reason)"


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _ints(text: str) -> list[int]:
    return [int(item) for item in _list(text)]


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Help that names each option's default, where it has one."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def _out(p, name: str) -> None:
    p.add_argument("--out", type=Path, default=None, help=f"JSON path (default: bench/out/{name}-<time>.json)")


def _dtype(p, default: str) -> None:
    p.add_argument("--dtype", default=default, choices=["float32", "float16", "bfloat16"], help="element type")


def _iters(p, default: int) -> None:
    p.add_argument("--iters", type=int, default=default, help="timed calls per measurement")


def _add_collectives(commands) -> None:
    p = commands.add_parser("collectives", help="nccl-tests style bandwidth of every collective and transport")
    p.add_argument("--backends", default=",".join(collectives.BACKENDS), help=BACKENDS_HELP)
    p.add_argument("--world-sizes", default="2", help="comma list, e.g. 2,4")
    p.add_argument("--collectives", default=",".join(collectives.COLLECTIVES), help="comma list")
    p.add_argument("--min-bytes", default="4K", help="smallest size, as nccl-tests counts it: all_gather's output, the others' input (K, M, G suffixes)")
    p.add_argument("--max-bytes", default="256M" if GPU else "16M", help="largest size (smaller on a CPU machine)")
    p.add_argument("--step", type=int, default=4, help="size multiplier between points")
    p.add_argument("--check", action="store_true", help="keep DistGroup's cross-rank signature checks on (measures their cost)")
    _dtype(p, "float32")
    _out(p, "collectives")


def _collectives_config(args) -> collectives.Config:
    return collectives.Config(
        backends=_list(args.backends), world_sizes=_ints(args.world_sizes), collectives=_list(args.collectives),
        min_bytes=parse_bytes(args.min_bytes), max_bytes=parse_bytes(args.max_bytes), step=args.step,
        dtype=args.dtype, check=args.check,
    )  # fmt: skip


def _add_layers(commands) -> None:
    p = commands.add_parser("layers", help="tensor-parallel GEMM + collective: bulk vs chunked overlap")
    p.add_argument("--backends", default="local,gloo,nccl", help=BACKENDS_HELP)
    p.add_argument("--world-sizes", default="2", help="comma list, e.g. 2,4,8")
    p.add_argument("--models", default="llama3-8b", help=f"comma list of {', '.join(layers.MODELS)}")
    p.add_argument("--tokens", default="2048,8192" if GPU else "256", help="M values, tokens per step (fewer on a CPU machine)")
    p.add_argument("--patterns", default=",".join(layers.PATTERNS), help="comma list")
    p.add_argument("--chunks", type=int, default=4, help="pieces per chunked GEMM+RS and GEMM+AR call")
    p.add_argument("--scale", type=int, default=1 if GPU else 4, help="divide layer widths by this (1 on a GPU machine, 4 on a CPU one)")
    _dtype(p, "bfloat16" if GPU else "float32")
    _iters(p, 20 if GPU else 3)
    _out(p, "layers")


def _layers_config(args) -> layers.Config:
    return layers.Config(
        backends=_list(args.backends), world_sizes=_ints(args.world_sizes), models=_list(args.models),
        tokens=_ints(args.tokens), patterns=_list(args.patterns), chunks=args.chunks, dtype=args.dtype,
        iters=args.iters, scale=args.scale,
    )  # fmt: skip


def _add_gemm(commands) -> None:
    p = commands.add_parser("gemm", help="interlace Triton GEMM vs cuBLAS, with and without overlap hooks (GPU)")
    p.add_argument("--shapes", default="all", help=f"comma list of names, or all: {', '.join(list(gemm.shapes())[:3])}, ...")
    p.add_argument("--chunks", type=int, default=8, help="hook chunks per GEMM")
    _dtype(p, "bfloat16")
    _out(p, "gemm")


def _gemm_config(args) -> gemm.Config:
    names = list(gemm.shapes()) if args.shapes == "all" else _list(args.shapes)
    unknown = sorted(set(names) - set(gemm.shapes()))
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; known: {', '.join(gemm.shapes())}")
    return gemm.Config(dtype=args.dtype, shapes=names, chunks=args.chunks)


def _add_pipeline(commands) -> None:
    p = commands.add_parser("pipeline", help="pipeline schedules: measured vs predicted makespan and bubble")
    p.add_argument("--ranks", type=int, default=4, help="pipeline stages, one rank thread each")
    p.add_argument("--microbatches", type=int, default=8, help="microbatches per step")
    p.add_argument("--rank-time", type=float, default=0.02, help="seconds per rank per microbatch (sleep)")
    _out(p, "pipeline")


def _pipeline_config(args) -> pipeline.Config:
    return pipeline.Config(ranks=args.ranks, microbatches=args.microbatches, rank_time=args.rank_time)


def _add_rank_slice(commands) -> None:
    p = commands.add_parser("rank_slice", help="one rank's GEMM + real communication volume on one GPU (d2d and host regimes)")
    p.add_argument("--world-size", type=int, default=8, help="the tensor-parallel size whose rank is sliced")
    p.add_argument("--models", default="llama3-8b,llama3-70b", help=f"comma list of {', '.join(layers.MODELS)}")
    p.add_argument("--tokens", default="2048,8192", help="M values (tokens per step)")
    p.add_argument("--patterns", default=",".join(rank_slice.PATTERNS), help="comma list")
    p.add_argument("--regimes", default=",".join(rank_slice.REGIMES), help="comma list: d2d (device memory), host (pinned, PCIe)")
    _dtype(p, "bfloat16")
    _iters(p, 10)
    _out(p, "rank_slice")
    p.add_argument("--resume", action="store_true",
                   help="keep the measured rows of the file at --out (a run of the same settings, cut off) and measure the rest")  # fmt: skip


def _rank_slice_config(args) -> rank_slice.Config:
    if args.resume and args.out is None:
        raise ValueError("--resume needs --out FILE: the result of the run to resume")
    config = rank_slice.Config(
        world_size=args.world_size, models=_list(args.models), tokens=_ints(args.tokens), patterns=_list(args.patterns),
        regimes=_list(args.regimes), dtype=args.dtype, iters=args.iters,
    )  # fmt: skip
    rank_slice.shapes(config)  # a layer the world size does not divide is refused before anything runs
    return config


def _add_decode(commands) -> None:
    p = commands.add_parser("decode", help="decode's all-reduce + residual + RMSNorm: unfused vs one fused kernel (GPU)")
    p.add_argument("--models", default="llama3-8b,llama3-70b", help=f"comma list of {', '.join(layers.MODELS)}")
    p.add_argument("--world-sizes", default="2,4,8", help="comma list of tensor-parallel sizes")
    p.add_argument("--tokens", default="1,8,16,64", help="M values (token rows per decode step)")
    _dtype(p, "bfloat16")
    _iters(p, 50)
    _out(p, "decode")


def _decode_config(args) -> decode.Config:
    return decode.Config(models=_list(args.models), world_sizes=_ints(args.world_sizes), tokens=_ints(args.tokens),
                         dtype=args.dtype, iters=args.iters)  # fmt: skip


BENCHMARKS = {"collectives": (collectives, _add_collectives, _collectives_config),
              "decode": (decode, _add_decode, _decode_config),
              "layers": (layers, _add_layers, _layers_config),
              "gemm": (gemm, _add_gemm, _gemm_config),
              "pipeline": (pipeline, _add_pipeline, _pipeline_config),
              "rank_slice": (rank_slice, _add_rank_slice, _rank_slice_config)}  # fmt: skip


# Long GPU runs write their rows as they go (marked "complete": false): a run cut off keeps them.
CHECKPOINTED = ("decode", "gemm", "layers", "rank_slice")


def run_benchmark(name: str, config, out: Path | None, resume: bool = False) -> tuple[Path, list[dict]]:
    """Run, print, write; returns the path and the rows that failed (each with its ``failed``
    (why)). ``resume``: see ``_earlier``. A GPU stream stuck ends the process (exit 3), leaving
    the rows written so far: tearing CUDA down behind a blocked stream could wait for good."""
    module, path = BENCHMARKS[name][0], result_path(name, out)
    print(f"{name}: measuring (rank processes start in about a second)...", file=sys.stderr, flush=True)
    earlier = {"earlier": _earlier(path, config)} if resume else {}
    env = envelope()  # once: each checkpoint would probe the GPUs again
    try:
        if name in CHECKPOINTED:
            def checkpoint(rows: list[dict]) -> None:
                write_result(name, asdict(config), rows, path, env, complete=False)

            result = module.run(config, checkpoint=checkpoint, **earlier)
        else:
            result = module.run(config)
    except StuckStream as error:
        print(f"{name} stopped: {error}; the rows measured before it are in {path}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(3)
    print(module.table(result))
    extra = {k: v for k, v in result.items() if k not in ("rows", "config")}
    write_result(name, result["config"], result["rows"], path, env, **extra)
    print(f"wrote {path}\n")
    return path, [r for r in result["rows"] if "failed" in r]


def _earlier(path: Path, config) -> dict | None:
    """The result at ``path`` to resume, if measured with ``config``: None when there is none, or
    it is complete (a finished run is measured afresh, not kept for good)."""
    if not path.exists():
        return None
    earlier = json.loads(path.read_text())
    if earlier.get("complete", True):
        print(f"--resume: {path} is a complete run: measuring afresh", file=sys.stderr, flush=True)
        return None
    if earlier.get("config") != asdict(config):
        raise SystemExit(f"--resume: {path} was measured with other settings ({earlier.get('config')}, not {asdict(config)}): "
                         "rerun with those, or move the file away to start afresh")  # fmt: skip
    return earlier


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    with_defaults = functools.partial(argparse.ArgumentParser, formatter_class=_ShowDefaults)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=with_defaults)
    for _, add, _ in BENCHMARKS.values():
        add(commands)
    commands.add_parser("demo", help="every benchmark this hardware supports, default settings")
    rep = commands.add_parser("report", help="markdown + SVG report of a rank_slice result")
    rep.add_argument("result", type=Path, help="a rank_slice result (JSON)")
    rep.add_argument("--out-dir", type=Path, default=Path("bench/results/report"), help="where rank_slice.md and its plots go")
    args = parser.parse_args(argv)
    if args.command == "report":
        print(f"wrote {report.main(args.result, args.out_dir)}")
        return 0
    names = list(BENCHMARKS) if args.command == "demo" else [args.command]
    failed = []
    for name in names:
        bench_args = parser.parse_args([name]) if args.command == "demo" else args
        try:
            config = BENCHMARKS[name][2](bench_args)
        except ValueError as error:
            parser.error(str(error))
        failed += run_benchmark(name, config, bench_args.out, getattr(bench_args, "resume", False))[1]
    return 1 if failed else 0  # each table lists its failed rows


if __name__ == "__main__":
    sys.exit(main())
