"""The benchmark suite: bandwidth arithmetic, size parsing, and a tiny real run through the CLI."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.collectives import busbw_factor, iterations
from bench.common import human_bytes, parse_bytes

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "collective,world_size,factor",
    # nccl-tests' PERFORMANCE.md: allreduce 2(n-1)/n; allgather, reducescatter, alltoall (n-1)/n; sendrecv 1
    [("all_reduce", 4, 1.5), ("all_reduce", 2, 1.0), ("all_gather", 4, 0.75), ("reduce_scatter", 8, 0.875),
     ("all_to_all", 2, 0.5), ("sendrecv", 4, 1.0), ("all_reduce", 1, 0.0)],
)  # fmt: skip
def test_bus_bandwidth_factors_match_nccl_tests(collective, world_size, factor):
    assert busbw_factor(collective, world_size) == pytest.approx(factor)


def test_iterations_are_bounded_and_shrink_with_size():
    counts = [iterations(1 << k, 256 << 20) for k in range(10, 32, 3)]
    assert counts == sorted(counts, reverse=True) and counts[0] == 100 and counts[-1] == 3


@pytest.mark.parametrize("text,value", [("4096", 4096), ("4K", 4096), ("16M", 16 << 20), ("1G", 1 << 30), ("2KiB", 2048), ("1.5K", 1536)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_parse_bytes_rejects_garbage():
    with pytest.raises(ValueError, match="not a byte size: '12Q'"):
        parse_bytes("12Q")


def test_human_bytes():
    assert [human_bytes(n) for n in (512, 4096, 16 << 20, 1 << 30, 1536)] == ["512 B", "4 KiB", "16 MiB", "1 GiB", "1536 B"]


def test_collectives_cli_writes_a_consistent_result(tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "bench", "collectives", "--backends", "local,gloo,nccl,symmetric", "--world-sizes", "2",
           "--min-bytes", "4K", "--max-bytes", "16K", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "busbw GB/s" in done.stdout and f"wrote {out}" in done.stdout
    result = json.loads(out.read_text())
    assert result["benchmark"] == "collectives" and "packages" in result["envelope"]
    rows, gpus = result["rows"], torch.cuda.device_count()
    ran = ["local", "gloo", "nccl", "symmetric"] if gpus >= 2 else ["local", "gloo"] if gpus else ["local", "gloo", "symmetric"]
    assert [s["backend"] for s in result["skipped"]] == [b for b in ["nccl", "symmetric"] if b not in ran]
    assert sorted({row["backend"] for row in rows}) == sorted(ran)
    assert len(rows) == len(ran) * 5 * 2  # backends x 5 collectives x 2 sizes
    for row in rows:
        assert row["time_us"] > 0
        assert row["algbw_GBps"] == pytest.approx(row["bytes"] / (row["time_us"] * 1e-6) / 1e9)
        assert row["busbw_GBps"] == pytest.approx(row["algbw_GBps"] * busbw_factor(row["collective"], row["world_size"]))
        assert row["bytes"] % (row["world_size"] * 4) == 0  # whole float32 rows per rank


def test_layers_cli_reports_overlap_metrics_consistently(tmp_path):
    out = tmp_path / "layers.json"
    cmd = [sys.executable, "-m", "bench", "layers", "--backends", "local,gloo", "--world-sizes", "2", "--scale", "64",
           "--tokens", "32", "--iters", "1", "--out", str(out)]  # fmt: skip
    cache = tmp_path / "dispatch.json"  # auto's decisions: made here, not taken from this machine's cache
    # on CPUs (no GPU visible): "local" would run on a GPU, where fused is timed too (bench-layers measures that)
    env = {**os.environ, "INTERLACE_DISPATCH_CACHE": str(cache), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "eta" in done.stdout and "llama3-8b/64/tp2/mlp-down" in done.stdout
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert len(rows) == 2 * 6  # two backends x six layers
    for r in rows:
        assert r["ideal_us"] == pytest.approx(max(r["gemm_us"], r["comm_us"]))
        assert r["eta"] == pytest.approx((r["gemm_us"] + r["comm_us"] - r["chunked_us"]) / min(r["gemm_us"], r["comm_us"]))
        assert r["sol"] == pytest.approx(r["ideal_us"] / r["chunked_us"])
        assert r["speedup"] == pytest.approx(r["bulk_us"] / r["chunked_us"])
        assert r["chunked_max_rel_err"] < 1e-5, "chunked must match bulk before it is timed"
        # auto: what the dispatcher decided on its first call (fused cannot be timed on a CPU), then timed like the rest
        assert "fused_us" not in r and r["auto"] in ("bulk", "chunked x1", "chunked x2", "chunked x4"), r["auto"]
        assert r["auto_vs_bulk"] == pytest.approx(r["auto_us"] / r["bulk_us"]) and r["auto_why"]
    assert {r["pattern"] for r in rows} == {"ag_gemm", "gemm_rs", "gemm_ar"}
    assert len(json.loads(cache.read_text())) == len(rows)  # one decision per layer and backend, measured in this run


def test_gemm_shape_table_is_llama3_70b_at_tp8():
    from bench.gemm import geomean, shapes

    table = shapes()
    # Llama-3-70B: hidden 8192, ffn 28672, 64 query and 8 key/value heads of 128; per rank at TP=8
    assert table["llama3-70b/tp8/qkv/m2048"] == (2048, (64 + 2 * 8) * 128 // 8, 8192)
    assert table["llama3-70b/tp8/o/m16"] == (16, 8192, 64 * 128 // 8)
    assert table["llama3-70b/tp8/gate-up/m8192"] == (8192, 2 * 28672 // 8, 8192)
    assert table["llama3-70b/tp8/down/m128"] == (128, 8192, 28672 // 8)
    assert len(table) == 2 + 4 * 4
    assert geomean([0.5, 2.0, 1.0]) == pytest.approx(1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on machines without a GPU")
def test_gemm_benchmark_says_why_it_skips_without_a_gpu(tmp_path):
    out = tmp_path / "gemm.json"
    done = subprocess.run([sys.executable, "-m", "bench", "gemm", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "skipped gemm: needs a GPU" in done.stdout
    assert json.loads(out.read_text())["rows"] == []


def test_pipeline_benchmark_measures_against_predictions(tmp_path):
    out = tmp_path / "pipeline.json"
    cmd = [sys.executable, "-m", "bench", "pipeline", "--ranks", "2", "--microbatches", "4", "--rank-time", "0.02", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["kind"] for r in rows] == ["gpipe", "forward", "forward", "forward", "decode", "decode"]
    for r in rows:
        assert r["error"] == pytest.approx(r["measured_ms"] / r["predicted_ms"] - 1)
        assert r["measured_ms"] >= 0.95 * r["predicted_ms"], "sleeping stages cannot finish early"


@pytest.mark.parametrize("world,tokens,pattern,message", [
    (3, 2048, "ag_gemm", r"llama3-8b/tp3/attn-qkv: M=2048 is not a multiple of the world size 3$"),
    (6, 2047, "gemm_rs", r"llama3-8b/tp6/attn-o: K=4096 is not a multiple of the world size 6; M=2047 is not a multiple of"),
    (3, 2, "gemm_ar", r"llama3-8b/tp3/attn-o: K=4096 is not a multiple of the world size 3$"),  # any M: AR cuts rows in chunks
])  # fmt: skip
def test_rank_slice_refuses_layers_the_world_size_does_not_divide(world, tokens, pattern, message, capsys):
    from bench import rank_slice
    from bench.__main__ import main

    config = rank_slice.Config(world_size=world, models=["llama3-8b"], tokens=[tokens], patterns=[pattern])
    with pytest.raises(ValueError, match=message):
        rank_slice.shapes(config)
    with pytest.raises(SystemExit) as stopped:  # the command line refuses it before anything runs
        main(["rank_slice", "--world-size", str(world), "--models", "llama3-8b", "--tokens", str(tokens), "--patterns", config.patterns[0]])
    assert stopped.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_a_layer_whose_fused_wait_gave_up_is_a_failed_row_naming_the_rank_that_knows_why():
    from bench import layers

    shape = {"name": "llama3-8b/tp2/attn-o", "pattern": "gemm_rs", "M": 256, "N": 4096, "K": 4096}
    samples = {kind: [1e-3 * (i + 1)] * 5 for i, kind in enumerate(layers.KINDS)}
    measured = {**shape, "name": "next", "max_rel_err": {"chunked": 1e-6}, "samples": samples, "auto": "bulk", "auto_why": "",
                "auto_measured": True}  # fmt: skip
    why = "rank 1: GEMM+RS: the GEMM's wait on chunk 0 timed out: expected flag >= 2, observed 1"
    per_rank = [[{**shape, "failed": "a fused wait gave up while timing: rank 0: a fused operator's wait failed on rank(s) [1]"}, measured],
                [{**shape, "failed": f"a fused wait gave up while timing: {why}"}, measured]]  # fmt: skip
    failed, next_row = layers.summarize(per_rank, "local", 2)
    assert failed == {"backend": "local", "world_size": 2, **shape, "failed": f"a fused wait gave up while timing: {why}"}
    assert "failed" not in next_row and next_row["name"] == "next" and next_row["bulk_us"] == pytest.approx(3e3)


def test_rank_slice_shape_table_is_the_layers_of_each_pattern():
    from bench import rank_slice

    rows = rank_slice.shapes(rank_slice.Config(models=["llama3-70b"], tokens=[2048]))
    table = {(r["pattern"], r["name"]): (r["M"], r["N"], r["K"]) for r in rows}
    assert len(table) == len(rows) == 2 * len(rank_slice.PATTERNS)
    # Llama-3-70B: hidden 8192, ffn 28672, 64 query and 8 key/value heads of 128 (full layer; the harness shards it)
    assert table["ag_gemm", "llama3-70b/tp8/attn-qkv/m2048"] == (2048, (64 + 2 * 8) * 128, 8192)
    assert table["gemm_rs", "llama3-70b/tp8/mlp-down/m2048"] == (2048, 8192, 28672)
    for layer in ("attn-o", "mlp-down"):  # both all-reduces of a layer, one-shot and two-shot
        name = f"llama3-70b/tp8/{layer}/m2048"
        assert table["gemm_ar_two_shot", name] == table["gemm_ar", name] == (2048, 8192, 8192 if layer == "attn-o" else 28672)


def test_rank_slice_holds_communication_against_the_bytes_at_the_link_rates():
    from bench.rank_slice import comm_floor, link_bytes

    rs = {"pattern": "gemm_rs", "M": 2048, "N": 8192, "K": 8192}  # Llama-3-70B attn-o, TP 8, bf16
    assert link_bytes(rs, 8, 2) == (7 * 256 * 8192 * 2, 0)  # seven blocks of 256 rows out, seven in
    # shards of x, K wide; and this rank's own shard into the gathered rows first
    assert link_bytes({**rs, "pattern": "ag_gemm", "N": 10240}, 8, 2) == (7 * 256 * 8192 * 2, 256 * 8192 * 2)
    assert link_bytes({**rs, "pattern": "gemm_ar"}, 8, 2) == (7 * 2048 * 8192 * 2, 0)
    assert link_bytes({**rs, "pattern": "gemm_ar_two_shot"}, 8, 2) == (2 * 7 * 256 * 8192 * 2, 0)  # 2(W-1)/W of the output
    rates = {"d2d": 4e12, "h2d": 5e10, "d2h": 4e10}
    assert comm_floor("d2d", 10**9, 0, rates) == pytest.approx(1e-3)  # 1 GB in and 1 GB out, each read and written: 4 GB at 4 TB/s
    assert comm_floor("host", 10**9, 0, rates) == pytest.approx(1 / 40)  # both directions at once: the slower one
    assert comm_floor("d2d", 10**9, 10**9, rates) == pytest.approx(1.5e-3)  # 1 GB more, read and written, before
    assert comm_floor("host", 10**9, 4 * 10**10, rates) == pytest.approx(0.02 + 0.02)  # before the inbound copies, not the outbound


def synthetic_rank_slice():
    """A rank-slice result as the GPU run writes it, with made-up times (bookkeeping only)."""
    import dataclasses

    from bench import rank_slice
    from bench.common import overlap_metrics as metrics
    from interlace.engine.overlap.dispatch import pick
    from interlace.engine.telemetry import envelope

    rows = []
    for name, pattern, regime, t in [  # auto: a fresh run of the pick, where it is not bulk; bulk_again: bulk timed again last
        ("a/tp8/attn-o/m2048", "gemm_rs", "d2d", dict(gemm=1.0, gemm_triton=1.0, gemm_hooked=1.05, comm=0.5, bulk=1.5, chunked=1.2, fused=1.08, fused_gemm=1.1, auto=1.1, bulk_again=1.49)),
        ("a/tp8/mlp-down/m2048", "gemm_rs", "d2d", dict(gemm=2.0, gemm_triton=2.0, gemm_hooked=2.0, comm=0.6, bulk=2.6, chunked=2.5, fused=2.5, fused_gemm=2.4, auto=2.52, bulk_again=2.61)),
        ("a/tp8/attn-o/m2048", "gemm_rs", "host", dict(gemm=1.0, gemm_triton=1.0, gemm_hooked=1.0, comm=3.0, bulk=4.0, chunked=3.5, fused=3.2, fused_gemm=1.2, auto=3.3, bulk_again=4.1)),
        ("a/tp8/qkv/m2048", "ag_gemm", "d2d", dict(gemm=1.0, gemm_triton=1.0, gemm_hooked=1.0, comm=0.4, bulk=1.4, chunked=1.5, fused=1.45, fused_gemm=1.3, bulk_again=1.43)),
    ]:  # fmt: skip
        m = metrics({k: v * 1e-3 for k, v in t.items()})
        m["ideal_us"] = m.pop("ideal") * 1e6
        m |= {"comm_floor_us": 0.8 * t["comm"] * 1e3, "comm_sol": 0.8}
        rows.append({"name": name, "pattern": pattern, "regime": regime, "M": 2048, "N": 1, "K": 1, "world_size": 8,
                     **{f"{k}_us": v * 1e3 for k, v in t.items()}, **m, "auto": pick({s: [t[s]] for s in ("bulk", "chunked", "fused")})[0]})  # fmt: skip
    config = dataclasses.asdict(rank_slice.Config(world_size=8, models=["llama3-8b"], tokens=[2048]))
    return {"benchmark": "rank_slice", "envelope": envelope(), "config": config, "rows": rows, "link_GBps": {"d2d": 3000.0, "h2d": 50.0, "d2h": 51.5}}


def test_rank_slice_checks_what_bulk_wrote_and_fails_on_poison_left_there():
    """A peer's buffer holds only what this rank sent it, the rest keeps the NaN poison in every
    variant: compared where bulk wrote, and a variant that left the poison there fails."""
    from bench.common import relative_error

    nan = float("nan")
    bulk = torch.tensor([[1.0, nan], [-4.0, nan]])
    assert relative_error(torch.tensor([[1.02, nan], [-4.0, 7.0]]), bulk) == pytest.approx(0.02 / 4)
    assert math.isnan(relative_error(torch.tensor([[nan, nan], [-4.0, nan]]), bulk))  # not < 2e-2: fails
    assert relative_error(torch.tensor([[nan]]), torch.tensor([[nan]])) == 0.0  # nothing was sent there


def test_rank_slice_metrics_follow_the_definitions():
    from bench.common import overlap_metrics as metrics

    m = metrics(dict(gemm=4.0, gemm_triton=4.2, gemm_hooked=4.4, comm=1.0, bulk=5.0, chunked=4.5, fused=4.2, fused_gemm=4.62))
    assert m["ideal"] == 4.0 and m["compute_bound"] == 1.0
    assert m["fused_eta"] == pytest.approx((4 + 1 - 4.2) / 1.0) and m["chunked_eta"] == pytest.approx(0.5)
    assert m["fused_sol"] == pytest.approx(4.0 / 4.2) and m["fused_speedup"] == pytest.approx(5.0 / 4.2)
    assert m["fused_gemm_slowdown"] == pytest.approx(4.62 / 4.4)  # against the same GEMM alone (plan, hooks)
    assert m["hook_cost"] == pytest.approx(4.4 / 4.2)  # that GEMM alone against the Triton GEMM on every SM, no hooks
    # the overlap alone: fused against its own (Triton) GEMM, where eta and SOL above count cuBLAS's speed too
    assert m["fused_eta_own"] == pytest.approx((4.4 + 1 - 4.2) / 1.0) and m["fused_sol_own"] == pytest.approx(4.4 / 4.2)


def test_report_checks_the_targets_and_draws_one_plot_per_pattern_and_regime(tmp_path):
    import xml.etree.ElementTree as ET

    from bench import report

    result = synthetic_rank_slice()
    (tmp_path / "r.json").write_text(json.dumps(result))
    path = report.main(tmp_path / "r.json", tmp_path / "out")
    text = path.read_text()
    # compute-bound d2d rows: attn-o (fused 1.08 vs ideal 1.0: within 1.1x, eta 0.84), mlp-down (2.5 vs 2.0: no), qkv (1.45: no)
    assert "fused within 1.1x the ideal on compute-bound d2d shapes: 1 of 3" in text
    assert "overlap efficiency >= 0.8 on those shapes: 1 of 3" in text
    # against fused's own GEMM alone: attn-o (1.05 / 1.08, eta 0.94) passes; mlp-down (2.0 / 2.5) and qkv (1.0 / 1.45) do not
    assert "the overlap only, without the kernel's speed): within 1.1x on 1, efficiency >= 0.8 on 1 of 3" in text
    # picks: fused, chunked (2.5 ties fused; 2.5 <= 0.98 x 2.6), fused, bulk (nothing 2% faster)
    assert [r["auto"] for r in result["rows"]] == ["fused", "chunked", "fused", "bulk"]
    assert ("`auto` never slower than bulk on any row: yes; it picks other than bulk on 3 of 4 rows, where fresh runs "
            "of its pick take at most 0.97x bulk's") in text  # fmt: skip
    # bulk twice: 1.5/1.49 (0.67%), 2.6/2.61 (0.38%), 4.0/4.1 (2.5%), 1.4/1.43 (2.14%), relative to the faster
    assert ("noise: bulk, timed first and again last on each row, differs from itself by 1.4% at the median, 2.5% at most "
            "(a/tp8/attn-o/m2048 [gemm_rs, host])") in text  # fmt: skip
    assert "| a/tp8/qkv/m2048 | d2d | 1000 | 400 | 0.80 | 1400 | 1500 | 1450 | 1000 |" in text and text.count("| bulk |") == 1
    assert "link rates measured in this run: device copy 3000 GB/s read plus written, host to device 50.0, device to host 51.5)" in text
    svgs = sorted(p.name for p in (tmp_path / "out").glob("*.svg"))
    assert svgs == ["rank_slice_ag_gemm_d2d.svg", "rank_slice_gemm_rs_d2d.svg", "rank_slice_gemm_rs_host.svg"]
    root = ET.parse(tmp_path / "out" / "rank_slice_gemm_rs_d2d.svg").getroot()
    assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 4  # bulk, chunked, fused, ideal
    assert f"({svgs[1]})" in text
    assert "Partial" not in text and "Failed" not in text


def test_report_names_a_cut_off_run_and_failed_shapes_and_leaves_them_out(tmp_path):
    from bench import report

    result = synthetic_rank_slice()
    error = "rank slice a/tp8/mlp-up/m2048 [d2d]: fused differs from bulk by 0.5 (relative)"
    result["rows"].insert(1, {"name": "a/tp8/mlp-up/m2048", "pattern": "gemm_rs", "regime": "d2d", "M": 2048, "N": 1, "K": 1,
                              "world_size": 8, "failed": error})  # fmt: skip
    result["complete"] = False
    (tmp_path / "r.json").write_text(json.dumps(result))
    text = report.main(tmp_path / "r.json", tmp_path / "out").read_text()
    assert "**Partial:** the run was cut off after 5 of its 16 rows (shape and regime)" in text  # llama3-8b at m2048: 8 shapes x 2 regimes
    assert f"**Failed (1):** not measured, and left out below.\n\n- a/tp8/mlp-up/m2048 [gemm_rs, d2d]: {error}" in text
    assert "| a/tp8/mlp-up/m2048 |" not in text
    assert "fused within 1.1x the ideal on compute-bound d2d shapes: 1 of 3" in text  # as without the failed row


def test_report_says_when_autos_pick_was_slower_than_bulk_and_why_a_run_stopped(tmp_path):
    from bench import report

    result = synthetic_rank_slice()
    result["rows"][2]["auto_us"] = 4200.0  # the fresh run of the host row's pick (fused) lost to bulk's 4100 us
    stuck = "rank slice a/tp8/o/m2048 [host]: timing fused: the GPU work queued did not finish within 60 s (a stream wait is stuck)"
    result["rows"].append({"name": "a/tp8/o/m2048", "pattern": "gemm_ar", "regime": "host", "failed": stuck, "stuck": True})
    result["complete"] = False
    (tmp_path / "r.json").write_text(json.dumps(result))
    text = report.main(tmp_path / "r.json", tmp_path / "out").read_text()
    assert ("`auto` never slower than bulk on any row: NO (a/tp8/attn-o/m2048 [gemm_rs, host] fused 4200 us vs bulk 4100 us (1.02x; "
            "bulk's own two runs 2.5% apart)); it picks "
            "other than bulk on 3 of 4 rows, where fresh runs of its pick take at most 1.02x bulk's") in text  # fmt: skip
    assert f"**Partial:** the run stopped ({stuck}) after 5 of its 16 rows" in text
    assert f"**Failed (1):** not measured, and left out below.\n\n- a/tp8/o/m2048 [gemm_ar, host]: {stuck}" in text


def test_resume_keeps_an_earlier_runs_measured_rows_and_says_which_run_measured_them(tmp_path):
    from bench import rank_slice, report
    from bench.__main__ import main

    result = synthetic_rank_slice()
    result["rows"].append({**result["rows"][0], "regime": "host", "failed": "RuntimeError: out of memory"})  # measured again
    stuck = {"name": "a/tp8/o/m2048", "pattern": "gemm_ar", "regime": "d2d", "failed": "... (a stream wait is stuck)", "stuck": True}
    result["rows"].append(stuck)  # kept: measuring it again would stop every resumed run there
    result["rows"][1]["earlier_run"] = {"commit": "abc", "timestamp": "2026-11-01T00:00:00+00:00", "tuning": "full"}  # kept twice
    older = {k: v for k, v in result["rows"][0].items() if k != "bulk_again_us"}
    result["rows"].append({**older, "regime": "host"})  # an older harness's row, without a time this one takes: measured again
    result["complete"] = False
    kept = rank_slice._measured(result)
    assert set(kept) == {(r["name"], r["pattern"], r["regime"]) for r in result["rows"][:4] + [stuck]}  # not the failed or older row
    env = result["envelope"]
    origin = {"commit": env["interlace"]["commit"], "timestamp": env["timestamp"], "tuning": env["interlace"]["tuning"]}
    assert kept["a/tp8/attn-o/m2048", "gemm_rs", "d2d"]["earlier_run"] == origin
    assert kept["a/tp8/mlp-down/m2048", "gemm_rs", "d2d"]["earlier_run"]["commit"] == "abc"
    out = tmp_path / "rank_slice.json"
    out.write_text(json.dumps(result))
    settings = ["rank_slice", "--out", str(out), "--resume", "--models", "llama3-8b", "--tokens", "2048"]
    with pytest.raises(SystemExit, match=r"--resume: .* was measured with other settings"):
        main([*settings, "--iters", "3"])
    if not torch.cuda.is_available():  # nothing measured here, and nothing measured before lost
        main(settings)
        rewritten = json.loads(out.read_text())
        assert len(rewritten["rows"]) == 5 and rewritten["complete"] is False
        text = report.render(rewritten)[0]
        assert "**Resumed:** 1 rows were measured by an earlier run (interlace at abc, 2026-11-01T00:00:00+00:00)" in text
        assert f"**Resumed:** 4 rows were measured by an earlier run (interlace at {origin['commit']}, {origin['timestamp']})" in text
        rewritten["complete"] = True  # a finished run is measured afresh, not kept for good
        out.write_text(json.dumps(rewritten))
        main(settings)
        assert json.loads(out.read_text())["rows"] == []


def test_printed_tables_list_failed_rows_after_the_measured_ones():
    from bench.common import report_table

    rows = [{"name": "ok", "t": 1.0}, {"name": "bad", "pattern": "gemm_rs", "regime": "host", "failed": "fused differs"},
            {"name": "bad2", "failed": "wrong"}]  # fmt: skip
    text = report_table("head", {"rows": rows}, [("name", "name", ""), ("t", "t", ".1f")])
    assert text.splitlines() == ["head", "name    t", "----  ---", "  ok  1.0", "FAILED bad [gemm_rs, host]: fused differs", "FAILED bad2: wrong"]


def test_the_report_and_resume_refuse_what_they_cannot_use(tmp_path, capsys):
    from bench import report
    from bench.__main__ import main

    layers_result = REPO / "bench" / "results" / "cpu-2core" / "layers.json"
    with pytest.raises(SystemExit, match=r"layers.json is a 'layers' result; the report is of a rank_slice result"):
        report.main(layers_result, tmp_path)
    with pytest.raises(SystemExit):
        main(["rank_slice", "--resume"])  # without --out it would start a new file, and resume nothing
    assert "error: --resume needs --out FILE: the result of the run to resume" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on machines without a GPU")
def test_rank_slice_says_why_it_skips_without_a_gpu(tmp_path):
    out = tmp_path / "rs.json"
    done = subprocess.run([sys.executable, "-m", "bench", "rank_slice", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "skipped rank_slice: needs a GPU" in done.stdout
    from bench import report  # `bench report` exits with what report.main raises

    with pytest.raises(SystemExit, match=r"rs.json holds no rows \(needs a GPU"):
        report.main(out, tmp_path / "report")
    missing = tmp_path / "never-written.json"  # a run killed before its first row
    with pytest.raises(SystemExit, match=re.escape(f"{missing} does not exist: `python -m bench rank_slice --out {missing}` writes it")):
        report.main(missing, tmp_path / "report")


@pytest.mark.parametrize("chunks", [1, 3, 4, 8])
def test_rank_slice_row_chunks_cover_every_row_and_none_is_empty(chunks):
    """An empty chunk (5 rows cut in 4 equal chunks of 2) has no signal counter, and its row failed."""
    from bench.rank_slice_gpu import _spans
    from interlace.ops.gemm import chunk_outputs

    for m in range(1, 40):
        spans = _spans(m, chunks)
        assert [i for s in spans for i in range(s.start, s.stop)] == list(range(m)), (m, spans)
        assert 0 < len(spans) <= chunks and all(s.stop > s.start for s in spans), (m, spans)
        assert len(spans) == len(chunk_outputs(m, 1, spans[0].stop))  # a counter per chunk


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["ag_gemm", "gemm_rs", "gemm_ar", "gemm_ar_two_shot"])
@pytest.mark.parametrize("regime", ["d2d", "host"])
def test_rank_slice_measures_every_variant_on_a_gpu(pattern, regime):
    import math

    from bench import rank_slice, rank_slice_gpu

    times, chosen = rank_slice_gpu.measure({"name": "test", "pattern": pattern, "M": 256, "N": 512, "K": 512}, regime, 2, torch.bfloat16, 2)
    confirmed = {"auto"} if chosen != "bulk" else set()
    assert set(times) == {*rank_slice.TIMED, *confirmed}  # what --resume takes a row of this harness to hold
    assert all(math.isfinite(t) and t > 0 for t in times.values())


@pytest.mark.gpu
def test_rank_slice_writes_its_rows_as_it_goes():
    from bench import rank_slice

    seen = []
    config = rank_slice.Config(world_size=2, models=["llama3-8b"], tokens=[256], patterns=["gemm_ar"], regimes=["d2d"], iters=2)
    result = rank_slice.run(config, checkpoint=lambda rows: seen.append([r["name"] for r in rows]))
    names = [r["name"] for r in result["rows"]]
    assert len(names) == 2 and seen == [names[:1], names]
    assert not any("failed" in r for r in result["rows"])
    assert all(0 < r["comm_sol"] < float("inf") for r in result["rows"]) and set(result["link_GBps"]) == {"d2d", "h2d", "d2h"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on machines without a GPU")
def test_decode_benchmark_says_why_it_skips_without_a_gpu(tmp_path):
    out = tmp_path / "decode.json"
    done = subprocess.run([sys.executable, "-m", "bench", "decode", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0 and "skipped decode: needs a GPU" in done.stdout
    assert json.loads(out.read_text())["config"]["world_sizes"] == [2, 4, 8]


@pytest.mark.gpu
def test_decode_benchmark_measures_both_epilogues_against_the_floor():
    from bench import decode

    result = decode.run(decode.Config(models=["llama3-8b"], world_sizes=[2, 8], tokens=[1, 16], iters=5))
    assert [(r["world_size"], r["M"]) for r in result["rows"]] == [(2, 1), (2, 16), (8, 1), (8, 16)]
    for r in result["rows"]:
        assert "failed" not in r, r
        assert 0 < r["floor_us"] < min(r["kernel_us"], r["fused_us"], r["unfused_us"])
