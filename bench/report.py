"""``python -m bench report RESULT.json --out-dir DIR``: a markdown report of a rank-slice result,
with one SVG plot per pattern (time per shape for bulk, chunked, fused and the ideal).

Generated, never edited by hand: the report names the hardware, versions and commit from the
result's envelope, and checks the targets: on compute-bound shapes (GEMM >= communication, d2d)
fused within 1.1x the ideal and overlap efficiency >= 0.8; the strategy ``auto`` picks (the
dispatcher's rule on the row's runs) never slower than bulk on fresh runs of both.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from xml.sax.saxutils import escape

from . import rank_slice
from .common import row_label

SERIES = (("bulk_us", "bulk", "#999999"), ("chunked_us", "chunked", "#1f77b4"), ("fused_us", "fused", "#d62728"),
          ("ideal_us", "ideal max(gemm, comm)", "#2ca02c"))  # fmt: skip
SOL_TARGET, ETA_TARGET = 1 / 1.1, 0.8


def svg_plot(title: str, labels: list[str], series: list[tuple[str, str, list[float]]], width: int = 720, height: int = 360) -> str:
    """A line chart: one polyline per (name, colour, values), x = labels, y from zero up."""
    left, right, top, bottom = 60, 20, 40, 110
    top_value = max((v for _, _, values in series for v in values), default=1.0) or 1.0
    x_step = (width - left - right) / max(len(labels) - 1, 1)

    def point(i: int, v: float) -> str:
        return f"{left + i * x_step:.1f},{height - bottom - (height - top - bottom) * v / top_value:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
             f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
             f'<text x="12" y="{top - 8}">us</text>',
             f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">{top_value:.0f}</text>',
             f'<text x="{left - 6}" y="{height - bottom + 4}" text-anchor="end">0</text>']  # fmt: skip
    for i, label in enumerate(labels):
        x, y = left + i * x_step, height - bottom + 12
        parts.append(f'<text x="{x:.1f}" y="{y}" transform="rotate(40 {x:.1f} {y})">{escape(label)}</text>')
    for j, (name, colour, values) in enumerate(series):
        pts = " ".join(point(i, v) for i, v in enumerate(values))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>')
        parts.append(f'<text x="{width - right - 160}" y="{top + 14 * j}" fill="{colour}">{escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def noise(row: dict) -> float:
    """How far apart a row's two timings of bulk are, relative to the faster: the same code timed
    twice: a difference between strategies smaller than that is noise."""
    first, again = row["bulk_us"], row["bulk_again_us"]
    return abs(first - again) / min(first, again)


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, checked row by row, with the noise they are measured in. ``auto``: the
    dispatcher's rule applied to a row's first runs; its pick was then timed again, and bulk last:
    those fresh runs are the check."""
    bound = [r for r in rows if r.get("compute_bound") and r["regime"] == "d2d"]
    sol_ok = [r for r in bound if r["fused_sol"] >= SOL_TARGET]
    eta_ok = [r for r in bound if r["fused_eta"] >= ETA_TARGET]
    own_sol_ok = [r for r in bound if r["fused_sol_own"] >= SOL_TARGET]
    own_eta_ok = [r for r in bound if r["fused_eta_own"] >= ETA_TARGET]
    picked = [r for r in rows if r["auto"] != "bulk"]
    slower = [f"{row_label(r)} {r['auto']} {r['auto_us']:.0f} us vs bulk {r['bulk_again_us']:.0f} us "
              f"({r['auto_us'] / r['bulk_again_us']:.2f}x; bulk's own two runs {noise(r):.1%} apart)"
              for r in picked if r["auto_us"] > r["bulk_again_us"]]  # fmt: skip
    worst = max((r["auto_us"] / r["bulk_again_us"] for r in picked), default=None)
    verdict = "yes" if not slower else f"NO ({'; '.join(slower)})"
    noisiest = max(rows, key=noise, default=None)
    return [
        *([f"- noise: bulk, timed first and again last on each row, differs from itself by {statistics.median(map(noise, rows)):.1%} "
           f"at the median, {noise(noisiest):.1%} at most ({row_label(noisiest)}): smaller differences "
           "between strategies are not significant"] if noisiest else []),  # fmt: skip
        f"- fused within 1.1x the ideal on compute-bound d2d shapes: {len(sol_ok)} of {len(bound)}",
        f"- overlap efficiency >= {ETA_TARGET} on those shapes: {len(eta_ok)} of {len(bound)}",
        f"- the same against fused's own Triton GEMM alone in place of cuBLAS's (the overlap only, without the "
        f"kernel's speed): within 1.1x on {len(own_sol_ok)}, efficiency >= {ETA_TARGET} on {len(own_eta_ok)} of {len(bound)}",
        f"- `auto` never slower than bulk on any row: {verdict}; it picks other than bulk on {len(picked)} of {len(rows)} rows"
        + (f", where fresh runs of its pick take at most {worst:.2f}x bulk's" if worst is not None else ""),
    ]


def render(result: dict) -> tuple[str, dict[str, str]]:
    """(markdown, {file name: svg}). Rows that failed are listed, and left out of targets and plots."""
    env, c = result["envelope"], result["config"]
    rows, failed = [r for r in result["rows"] if "failed" not in r], [r for r in result["rows"] if "failed" in r]
    gpus = ", ".join(g["name"] for g in env.get("gpus", [])) or "no GPU"
    git = env["interlace"]
    lines = [f"# Rank-slice report: TP={c['world_size']}, {c['dtype']}", "",
             f"{gpus}; driver {env['cuda'].get('driver')}; torch {env['packages']['torch']}, triton {env['packages']['triton']}; "
             f"interlace {git['version']} at {git['commit']}{' (local changes)' if git.get('dirty') else ''}; {env['timestamp']}; "
             f"GEMM tuning {git.get('tuning', 'full')} (quick: 2 of the 8 candidate configs).",
             "", "One rank's real GEMM with its real per-rank communication volume moved by copy engines from buffers standing "
             "in for peers: d2d = device memory (HBM, faster than NVLink), host = pinned host memory (PCIe). CUDA events, "
             f"median of {c['iters']}. gemm = cuBLAS; eta and SOL are fused's, against it; \"own\" ones against fused's "
             "GEMM alone (its plan and hooks, nothing to wait for). GEMM slowdown: the GEMM inside fused over that GEMM "
             "alone (for AG: beside the copies, not waiting for them). Hook cost: that GEMM alone over the Triton GEMM on "
             "every SM without hooks (the SMs fused leaves free: 1 for AG, 8 for two-shot; and the hooks). Fused runs "
             "as a check=False call (no host synchronisation per call). comm SOL: the communication's floor (the bytes "
             f"each way at the link rates measured in this run: {_rates(result)}) over its time.",
             *_incomplete(result, failed), "", "## Targets", "", *targets(rows)]  # fmt: skip
    svgs = {}
    for pattern in sorted({r["pattern"] for r in rows}):
        mine = [r for r in rows if r["pattern"] == pattern]
        lines += ["", f"## {pattern}", "", "| layer | regime | gemm us | comm us | comm SOL | bulk us | chunked us | fused us | ideal us | eta | SOL | own eta "
                  "| own SOL | GEMM slowdown | hook cost | auto |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in mine:
            lines.append(f"| {r['name']} | {r['regime']} | {r['gemm_us']:.0f} | {r['comm_us']:.0f} | {r['comm_sol']:.2f} | {r['bulk_us']:.0f} | {r['chunked_us']:.0f} | "
                         f"{r['fused_us']:.0f} | {r['ideal_us']:.0f} | {r['fused_eta']:.2f} | {r['fused_sol']:.2f} | "
                         f"{r['fused_eta_own']:.2f} | {r['fused_sol_own']:.2f} | {r['fused_gemm_slowdown']:.2f} | {r['hook_cost']:.2f} | "
                         f"{r['auto']} |")  # fmt: skip
        for regime in sorted({r["regime"] for r in mine}):
            subset = [r for r in mine if r["regime"] == regime]
            name = f"rank_slice_{pattern}_{regime}.svg"
            series = [(label, colour, [r[key] for r in subset]) for key, label, colour in SERIES]
            svgs[name] = svg_plot(f"{pattern} ({regime}): time per layer", [r["name"] for r in subset], series)
            lines += ["", f"![{pattern} {regime}]({name})"]
    return "\n".join(lines) + "\n", svgs


def _rates(result: dict) -> str:
    rates = result.get("link_GBps")  # written when the run ends: a run cut off has its rows' floors only
    if rates is None:
        return "not recorded, the run was cut off"
    return f"device copy {rates['d2d']:.0f} GB/s read plus written, host to device {rates['h2d']:.1f}, device to host {rates['d2h']:.1f}"


def _incomplete(result: dict, failed: list[dict]) -> list[str]:
    """What the report lacks, or took from elsewhere: a run cut off before its last shape, rows an
    earlier run measured (``--resume``), and shapes that failed."""
    lines, c = [], result["config"]
    if not result.get("complete", True):
        planned = len(rank_slice.shapes(rank_slice.Config(**c))) * len(c["regimes"])
        stuck = [r for r in result["rows"] if r.get("stuck") and "earlier_run" not in r]
        why = f"stopped ({stuck[-1]['failed']})" if stuck else "was cut off"
        lines += ["", f"**Partial:** the run {why} after {len(result['rows'])} of its {planned} rows "
                  "(shape and regime); the rest were never measured."]  # fmt: skip
    earlier = Counter((r["earlier_run"]["commit"], r["earlier_run"]["timestamp"]) for r in result["rows"] if "earlier_run" in r)
    for (commit, timestamp), count in sorted(earlier.items(), key=lambda kv: kv[0][1]):
        lines += ["", f"**Resumed:** {count} rows were measured by an earlier run (interlace at {commit}, {timestamp}) "
                  "and kept by `--resume`; the envelope above is the last run's."]  # fmt: skip
    if failed:
        lines += ["", f"**Failed ({len(failed)}):** not measured, and left out below.", ""]
        lines += [f"- {row_label(r)}: {r['failed']}" for r in failed]
    return lines


def main(result_path: Path, out_dir: Path) -> Path:
    if not Path(result_path).is_file():
        raise SystemExit(f"{result_path} does not exist: `python -m bench rank_slice --out {result_path}` writes it")
    result = json.loads(Path(result_path).read_text())
    if result.get("benchmark") != "rank_slice":
        raise SystemExit(f"{result_path} is a {result.get('benchmark')!r} result; the report is of a rank_slice result "
                         "(`python -m bench rank_slice` writes one)")  # fmt: skip
    if not result["rows"]:
        raise SystemExit(f"{result_path} holds no rows ({'; '.join(s['why'] for s in result.get('skipped', []))})")
    markdown, svgs = render(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, svg in svgs.items():
        (out_dir / name).write_text(svg)
    path = out_dir / "rank_slice.md"
    path.write_text(markdown)
    return path
