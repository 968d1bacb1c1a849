"""`meta-pipeline bench`: how fast and how big, per asset, against naive baselines and the floor.

What one run measures, for each size of the tier(s) asked for (one domain of
synthetic trades from ``synth``, written as a CSV in the ingest contract):

* **ingest** — ``ingest_file`` on that CSV (read, validate, insert), the user path;
* **every learning asset** — the asset functions themselves, directly invoked in
  the order a run materializes them, all in one resource scope like one in-process
  Dagster run (so the run's read cache, lesson-incidence memo and background
  prefetch are in play), with wall time, CPU time and the process's peak resident
  memory while the asset ran (a prefetch started by one asset is charged to the
  asset that runs while it loads);
* **the floor** — reading the same input (the four source tables, through the same
  store) plus one groupby over the lesson×trade rows: no learning can be cheaper;
* **naive baselines** — what a user would otherwise write: a per-lesson
  ``curve_fit`` loop (half-lives), pairwise Python-set Jaccard (factors), a
  per-lesson override loop — timed against our core on the same in-memory inputs;
  where a full run would take too long it is timed on a sample and extrapolated,
  and the report says so;
* **Dagster** — ``dagster asset materialize --select group:learning`` for the
  domain, with the repository's in-process executor and with the multiprocess
  executor (spawn and forkserver), against the direct pass;
* the **large** tier adds a 20-domain fleet: ingest and learn every domain one
  after the other in one process, then as two concurrent processes (what the run
  queue's limit of 2 concurrent runs gives on two cores).

Scaling exponents are least-squares slopes of log(time) on log(trades) over the
sizes run. Every timed stage runs in a fresh Python process (a *worker*, ``python
-m meta_pipeline.lab.bench worker ...``), so peak memory is per stage: the kernel's
high-water mark (``VmHWM``) reset at the start of each stage through
``/proc/self/clear_refs`` (falls back to ``ru_maxrss`` where that is not
available). Everything the report shows comes from the JSON the workers printed.

The pure parts (tiers, exponents, ratios, the report) take and return plain data;
the shell runs workers and writes files.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

MIB = 1024.0 * 1024.0
DOMAIN = "dom0"


# ---------------------------------------------------------------------------
# Tiers
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Tier:
    """A benchmark size: trades in one domain, plus optionally a fleet of smaller domains."""

    name: str
    n_trades: int
    fleet_domains: int = 0
    fleet_trades: int = 0


TIERS: dict[str, Tier] = {
    "small": Tier("small", 10_000),
    "medium": Tier("medium", 100_000),
    "large": Tier("large", 1_000_000, fleet_domains=20, fleet_trades=50_000),
    "xlarge": Tier("xlarge", 5_000_000),
}
# `all` = small, medium, large; `scale` = medium, large, xlarge (the exponents across 100k/1M/5M)
GROUPS: dict[str, tuple[str, ...]] = {"all": ("small", "medium", "large"), "scale": ("medium", "large", "xlarge")}
TIER_CHOICES = (*TIERS, *GROUPS)


def tiers_for(choice: str) -> list[Tier]:
    """`all` runs every tier, smallest first (the exponents need at least two sizes)."""
    if choice in GROUPS:
        return sorted((TIERS[name] for name in GROUPS[choice]), key=lambda t: t.n_trades)
    if choice not in TIERS:
        raise ValueError(f"unknown tier {choice!r}: use one of {', '.join(TIER_CHOICES)}")
    return [TIERS[choice]]


@dataclass(frozen=True)
class BenchOptions:
    repeat: int = 1
    seed: int = 0
    naive_budget_s: float = 60.0  # a naive baseline predicted to take longer is sampled and extrapolated
    dagster: bool = True  # measure `dagster asset materialize`
    dagster_multiprocess_max_trades: int = 10_000  # above this, the multiprocess runs are skipped (minutes each)
    fleet: bool = True
    controller_day: bool = True  # controller runs + Dagster storage per simulated day at 100 domains
    naive: bool = True  # time the naive baselines (minutes at 5M: --no-naive skips them)
    cli: bool = True  # the user's path: `meta-pipeline ingest` then `dagster asset materialize` (fresh processes)
    cli_max_trades: int = 1_000_000  # above this the CLI path is skipped (it repeats ingest and learning)
    keep_data: bool = False
    # tests: run the stages in this process (no per-stage memory figures, no process start-up)
    workers_in_process: bool = False


# ---------------------------------------------------------------------------
# Pure helpers: exponents, ratios, summaries
# ---------------------------------------------------------------------------


def scaling_exponent(sizes: Sequence[float], times: Sequence[float]) -> float | None:
    """Least-squares slope k of log(time) = c + k·log(size); None with fewer than two distinct sizes."""
    x = np.log(np.asarray(sizes, dtype=float))
    y = np.log(np.asarray(times, dtype=float))
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if np.unique(x).size < 2:
        return None
    slope, _ = np.polyfit(x, y, 1)
    return float(slope)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or not denominator > 0:
        return None
    return float(numerator) / float(denominator)


def median_of(runs: Sequence[dict[str, Any]], key: str) -> float:
    return float(np.median([r[key] for r in runs]))


def summarize_runs(runs: Sequence[dict[str, Any]], keys: Sequence[str] = ("wall_s", "cpu_s", "peak_rss_mib")) -> dict:
    """Median of each figure over repeats, plus the wall-time spread (min, max)."""
    out: dict[str, Any] = {k: median_of(runs, k) for k in keys if all(k in r for r in runs)}
    walls = [r["wall_s"] for r in runs]
    out["wall_min_s"], out["wall_max_s"], out["repeats"] = float(min(walls)), float(max(walls)), len(runs)
    return out


def exponents_of(sizes: list[dict[str, Any]]) -> dict[str, float | None]:
    """Scaling exponent of ingest, every asset, the learning pass and the floor over the sizes run."""
    if not sizes:
        return {}
    n = [s["n_trades"] for s in sizes]
    names = ["ingest", *(["ingest_floor"] if all("ingest_floor" in s for s in sizes) else []),
             *sizes[0]["assets"].keys(), "learning_pass", "floor"]
    out: dict[str, float | None] = {}
    for name in names:
        times = []
        for s in sizes:
            if name in ("ingest", "ingest_floor"):
                times.append(s[name]["wall_s"])
            elif name == "learning_pass":
                times.append(s["learning_pass"]["wall_s"])
            elif name == "floor":
                times.append(s["floor"]["wall_s"])
            else:
                times.append(s["assets"][name]["wall_s"])
        out[name] = scaling_exponent(n, times)
    # the CPU-time exponent of the pass is less sensitive to other load on the machine
    out["learning_pass_cpu"] = scaling_exponent(n, [s["learning_pass"]["cpu_s"] for s in sizes])
    return out


def local_exponents(sizes: list[dict[str, Any]]) -> dict[str, float | None]:
    """Slope between the two largest sizes only (closer to the asymptotic cost than the fit)."""
    if len(sizes) < 2:
        return {}
    return exponents_of(sorted(sizes, key=lambda s: s["n_trades"])[-2:])


TARGET_TRADES = 1_000_000
TARGET_WALL_S = 60.0
TARGET_PEAK_MIB = 4096.0
TARGET_EXPONENT = 1.2
TARGET_FLOOR_RATIO = 5.0


def evaluate_targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's "done when" targets, each with the measured figure and whether it is met (None: not measured)."""
    large = next((s for s in result["sizes"] if s["n_trades"] >= TARGET_TRADES), None)
    out: dict[str, Any] = {}
    if large is not None:
        total = large["ingest"]["wall_s"] + large["learning_pass"]["wall_s"]
        peak = max([large["ingest"]["peak_rss_mib"], large["learning_pass"]["peak_rss_mib"]])
        out["large_wall_s"] = {"value": total, "limit": TARGET_WALL_S, "met": total < TARGET_WALL_S}
        out["large_peak_mib"] = {"value": peak, "limit": TARGET_PEAK_MIB, "met": peak < TARGET_PEAK_MIB}
        fr = large.get("floor_ratio")
        out["large_floor_ratio"] = {"value": fr, "limit": TARGET_FLOOR_RATIO,
                                    "met": None if fr is None else fr <= TARGET_FLOOR_RATIO}
    else:
        out["large_wall_s"] = out["large_peak_mib"] = out["large_floor_ratio"] = {"value": None, "met": None}
    out.update(scale_targets(result))
    exps = {k: v for k, v in result.get("exponents", {}).items() if k not in ("learning_pass_cpu",) and v is not None}
    worst = max(exps.items(), key=lambda kv: kv[1]) if exps else None
    out["max_exponent"] = {
        "value": None if worst is None else worst[1],
        "which": None if worst is None else worst[0],
        "limit": TARGET_EXPONENT,
        "met": None if worst is None else worst[1] <= TARGET_EXPONENT,
    }
    return out


# issue 17 (scale): 1M < 30 s and < 3 GiB; ingest < 1 GiB at any size and within 1.5× its floor;
# 5M complete, < 8 GiB, time <= 5.5× the 1M time
SCALE_1M_WALL_S, SCALE_1M_PEAK_MIB, SCALE_1M_CLI_WALL_S = 30.0, 3072.0, 40.0
INGEST_PEAK_MIB, INGEST_FLOOR_RATIO = 1024.0, 1.5
SCALE_5M_PEAK_MIB, SCALE_5M_TIME_RATIO = 8192.0, 5.5


def _total(size: dict[str, Any]) -> float:
    return size["ingest"]["wall_s"] + size["learning_pass"]["wall_s"]


def _peak(size: dict[str, Any]) -> float:
    return max(size["ingest"]["peak_rss_mib"], size["learning_pass"]["peak_rss_mib"])


def scale_targets(result: dict[str, Any]) -> dict[str, Any]:
    """The scale targets: each with its measured figure, limit and whether it is met (None: not measured)."""
    by_n = {s["n_trades"]: s for s in result.get("sizes", [])}
    m1, m5 = by_n.get(1_000_000), by_n.get(5_000_000)
    out: dict[str, Any] = {}

    def judge(key: str, value: float | None, limit: float) -> None:
        out[key] = {"value": value, "limit": limit, "met": None if value is None else value < limit}

    judge("1M_total_wall_s", _total(m1) if m1 else None, SCALE_1M_WALL_S)
    cli = (m1 or {}).get("cli")
    judge("1M_cli_wall_s", cli["wall_s"] if cli and cli["ok"] else None, SCALE_1M_CLI_WALL_S)
    judge("1M_peak_mib", _peak(m1) if m1 else None, SCALE_1M_PEAK_MIB)
    for label, size in (("1M", m1), ("5M", m5)):
        judge(f"{label}_ingest_peak_mib", size["ingest"]["peak_rss_mib"] if size else None, INGEST_PEAK_MIB)
        fr = size.get("ingest_floor_ratio") if size else None
        out[f"{label}_ingest_floor_ratio"] = {"value": fr, "limit": INGEST_FLOOR_RATIO,
                                              "met": None if fr is None else fr <= INGEST_FLOOR_RATIO}
    judge("5M_peak_mib", _peak(m5) if m5 else None, SCALE_5M_PEAK_MIB)
    tr = ratio(_total(m5), _total(m1)) if m1 and m5 else None
    out["5M_time_over_1M"] = {"value": tr, "limit": SCALE_5M_TIME_RATIO,
                              "met": None if tr is None else tr <= SCALE_5M_TIME_RATIO}
    return out


# ---------------------------------------------------------------------------
# Report: markdown, plot, console table
# ---------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def _trades_label(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n // 1000}k" if n >= 1000 else str(n)


def size_table(size: dict[str, Any]) -> list[list[str]]:
    """Rows (stage, wall s, cpu s, peak MiB, rows written, share of the pass) for one size."""
    pass_wall = size["learning_pass"]["wall_s"]
    rows = [["ingest (read+validate+insert)", _fmt(size["ingest"]["wall_s"]), _fmt(size["ingest"]["cpu_s"]),
             _fmt(size["ingest"]["peak_rss_mib"], 0), _fmt(size["source_rows"]), ""]]
    if "ingest_floor" in size:
        fl = size["ingest_floor"]
        rows.append([f"ingest floor (pyarrow read + 1 bulk insert); ingest = {_fmt(size['ingest_floor_ratio'])}× it",
                     _fmt(fl["wall_s"]), _fmt(fl["cpu_s"]), _fmt(fl["peak_rss_mib"], 0), _fmt(fl.get("rows")), ""])
    for name, a in size["assets"].items():
        rows.append([name, _fmt(a["wall_s"]), _fmt(a["cpu_s"]), _fmt(a["peak_rss_mib"], 0), _fmt(a.get("rows")),
                     f"{100 * a['wall_s'] / pass_wall:.0f}%" if pass_wall else ""])
    lp = size["learning_pass"]
    rows.append(["learning pass (all assets)", _fmt(lp["wall_s"]), _fmt(lp["cpu_s"]), _fmt(lp["peak_rss_mib"], 0), "", "100%"])
    fl = size["floor"]
    rows.append([f"floor (read + 1 groupby of {_fmt(fl['incidence_rows'])} lesson×trade rows)", _fmt(fl["wall_s"]),
                 _fmt(fl["cpu_s"]), _fmt(fl["peak_rss_mib"], 0), "", ""])
    rows.append(["ingest + learning pass", _fmt(size["ingest"]["wall_s"] + lp["wall_s"]),
                 _fmt(size["ingest"]["cpu_s"] + lp["cpu_s"]),
                 _fmt(max(size["ingest"]["peak_rss_mib"], lp["peak_rss_mib"]), 0), "", ""])
    cli = size.get("cli")
    if cli:
        for name, key in (("CLI: meta-pipeline ingest (process start to exit)", "ingest"),
                          ("CLI: dagster asset materialize --select group:learning", "materialize")):
            r = cli[key]
            rows.append([name + ("" if r["ok"] else f" FAILED (exit {r['returncode']})"), _fmt(r["wall_s"]), "",
                         _fmt(r["peak_rss_mib"], 0), "", ""])
        rows.append(["CLI: both commands", _fmt(cli["wall_s"]), "", _fmt(cli["peak_rss_mib"], 0), "", ""])
    return rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda r: "  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *[fmt(r) for r in rows]])


STAGE_HEADER = ["stage", "wall s", "cpu s", "peak MiB", "rows", "of pass"]


def naive_rows(size: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, nb in size.get("naive", {}).items():
        rows.append([
            name, nb["baseline"], _fmt(nb.get("naive_s")), _fmt(nb.get("ours_s"), 3),
            _fmt(nb.get("speedup"), 1) + "×" if nb.get("speedup") is not None else "–",
            nb.get("how", ""), nb.get("agreement", ""),
        ])
    return rows


NAIVE_HEADER = ["asset", "naive way", "naive s", "ours s", "ours faster by", "naive timed on", "same result"]


def dagster_rows(size: dict[str, Any]) -> list[list[str]]:
    d = size.get("dagster") or {}
    direct = size["learning_pass"]["wall_s"]
    rows = [["direct (the bench's pass, no Dagster run)", _fmt(direct), "1.00", ""]]
    for name, r in d.get("runs", {}).items():
        if r.get("skipped"):
            rows.append([name, "–", "–", r["skipped"]])
            continue
        rows.append([name, _fmt(r["wall_s"]), _fmt(ratio(r["wall_s"], direct)),
                     ("ok" if r["ok"] else f"FAILED (exit {r['returncode']})")])
    if "import_s" in d:
        rows.append(["python + import meta_pipeline.definitions (part of every CLI run)", _fmt(d["import_s"]), "", ""])
    return rows


DAGSTER_HEADER = ["how", "wall s", "× direct", "status"]


def render_markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    out = [
        "# meta-pipeline bench",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['cpus']} CPUs, {meta['platform']}, Python {meta['python']}; "
        f"load average {meta['load_before']} before, {meta['load_after']} after "
        f"(other work on the machine inflates wall times; CPU times are steadier).  ",
        f"Started {meta['started_at']}, took {meta['elapsed_s']:.0f} s. Repeats per timing: {meta['repeat']} "
        "(figures are medians; the wall-time spread is in the JSON).  ",
        f"Memory: {meta['memory_method']}",
        "",
    ]
    targets = result.get("targets", {})
    if targets:
        out += ["## Targets (1M trades in one domain)", ""]
        trows = []
        for key, label, unit in (
            ("large_wall_s", "ingest + all learning assets, wall", "s"),
            ("large_peak_mib", "peak memory of any stage", "MiB"),
            ("max_exponent", "largest scaling exponent", ""),
            ("large_floor_ratio", "learning pass ÷ floor", "×"),
            ("1M_total_wall_s", "scale: 1M ingest + learning, wall", "s"),
            ("1M_peak_mib", "scale: 1M peak of any stage", "MiB"),
            ("1M_ingest_peak_mib", "scale: 1M ingest peak", "MiB"),
            ("1M_ingest_floor_ratio", "scale: 1M ingest ÷ ingest floor", "×"),
            ("5M_ingest_peak_mib", "scale: 5M ingest peak", "MiB"),
            ("5M_ingest_floor_ratio", "scale: 5M ingest ÷ ingest floor", "×"),
            ("5M_peak_mib", "scale: 5M peak of any stage", "MiB"),
            ("5M_time_over_1M", "scale: 5M total ÷ 1M total", "×"),
        ):
            t = targets.get(key, {})
            which = f" ({t['which']})" if t.get("which") else ""
            trows.append([label, _fmt(t.get("value")) + (f" {unit}" if unit and t.get("value") is not None else "") + which,
                          f"{_fmt(t.get('limit'))} {unit}".strip() if t.get("limit") is not None else "",
                          "not measured" if t.get("met") is None else ("met" if t["met"] else "NOT met")])
        out += [_md_table(["target", "measured", "limit", ""], trows), ""]
    for size in result["sizes"]:
        n = size["n_trades"]
        out += [f"## {_trades_label(n)} trades, one domain ({_fmt(size['source_rows'])} source rows)", ""]
        out += [_md_table(STAGE_HEADER, size_table(size)), ""]
        out += [f"Learning pass ÷ floor: **{_fmt(size.get('floor_ratio'))}×** "
                f"(floor: read {_fmt(size['floor']['read_s'])} s + groupby {_fmt(size['floor']['groupby_s'], 3)} s). "
                f"Run cache: {size['cache']['hits']} reads served from memory, {size['cache']['misses']} from the "
                f"database; once-per-run values reused {size['cache'].get('memo_hits', 0)}× (the lesson incidence, "
                "the knobs in effect, the learning window).", ""]
        if size.get("naive"):
            out += ["Naive baselines (same in-memory inputs, core against core):", "",
                    _md_table(NAIVE_HEADER, naive_rows(size)), ""]
        if size.get("dagster"):
            out += ["Through Dagster (`dagster asset materialize -m meta_pipeline.definitions --select group:learning "
                    f"--partition {DOMAIN}`, a fresh process each, asset checks included):", "",
                    _md_table(DAGSTER_HEADER, dagster_rows(size)), ""]
    exps = result.get("exponents") or {}
    if exps:
        local = result.get("local_exponents") or {}
        out += ["## Scaling exponents (time ∝ trades^k)", "",
                "Least squares over the sizes run" + (f"; 'top two' uses only the two largest sizes." if local else "."), ""]
        erows = [[k, _fmt(v), _fmt(local.get(k))] for k, v in exps.items()]
        out += [_md_table(["stage", "k (all sizes)", "k (top two)"], erows), ""]
    fleet = result.get("fleet")
    if fleet:
        out += [f"## Fleet: {fleet['domains']} domains × {_fmt(fleet['trades_per_domain'])} trades", ""]
        frows = [
            ["ingest, all domains one after the other", _fmt(fleet["ingest"]["wall_s"]), _fmt(fleet["ingest"]["peak_rss_mib"], 0)],
            ["learning, all domains one after the other (1 process)", _fmt(fleet["sequential"]["wall_s"]),
             _fmt(fleet["sequential"]["peak_rss_mib"], 0)],
            ["learning, 2 concurrent processes (half the domains each)", _fmt(fleet["two_way"]["wall_s"]),
             _fmt(fleet["two_way"]["peak_rss_mib"], 0)],
        ]
        out += [_md_table(["stage", "wall s", "peak MiB (per process)"], frows), "",
                f"Per domain: {_fmt(fleet['sequential']['per_domain_s'])} s sequential; two concurrent runs are "
                f"{_fmt(fleet['two_way_speedup'])}× faster than one after another "
                "(the run queue allows 2 concurrent runs: dagster.yaml).", ""]
    day = result.get("controller_day")
    if day:
        out += [f"## Controller runs per simulated day: {day['domains']} domains, "
                f"{_fmt(day['batches_per_min_per_domain'])} telemetry batches a minute each", "",
                f"Storage per controller run measured ({day['measured_runs']} runs of `controller_job` on a fresh "
                f"SQLite instance: {_fmt(day['bytes_per_run'] / 1024, 1)} KiB of runs + event log each); runs per day "
                f"simulated with the sensor's own rule (`automation.run_due`, ticks every {_fmt(day['sensor_tick_s'])} s).",
                "", _md_table(["policy", "runs / day", "Dagster storage / day (MiB)"],
                              [["one run per batch (before)", _fmt(day["per_batch"]["runs"]),
                                _fmt(day["per_batch"]["storage_mib_per_day"], 0)],
                               [f"coalesced, ≤ 1 per domain per {_fmt(day['coalesce_s'], 0)} s",
                                _fmt(day["coalesced"]["runs"]), _fmt(day["coalesced"]["storage_mib_per_day"], 0)]]), ""]
    out += ["![time against trades](scaling.png)", ""]
    return "\n".join(out)


def render_console(result: dict[str, Any]) -> str:
    parts = []
    for size in result["sizes"]:
        parts.append(f"\n{_trades_label(size['n_trades'])} trades, one domain — learning pass ÷ floor "
                     f"{_fmt(size.get('floor_ratio'))}×")
        parts.append(_text_table(STAGE_HEADER, size_table(size)))
        if size.get("naive"):
            parts.append(_text_table(NAIVE_HEADER, naive_rows(size)))
        if size.get("dagster"):
            parts.append(_text_table(DAGSTER_HEADER, dagster_rows(size)))
    if result.get("exponents"):
        local = result.get("local_exponents") or {}
        parts.append("\nscaling exponents (time ∝ trades^k)")
        parts.append(_text_table(["stage", "k", "k top two"], [[k, _fmt(v), _fmt(local.get(k))] for k, v in result["exponents"].items()]))
    if result.get("fleet"):
        f = result["fleet"]
        parts.append(f"\nfleet {f['domains']}×{_fmt(f['trades_per_domain'])}: ingest {_fmt(f['ingest']['wall_s'])} s, "
                     f"learning sequential {_fmt(f['sequential']['wall_s'])} s, 2 concurrent {_fmt(f['two_way']['wall_s'])} s")
    day = result.get("controller_day")
    if day:
        parts.append(f"\ncontroller runs per simulated day at {day['domains']} domains "
                     f"({_fmt(day['batches_per_min_per_domain'])} batches/min each; "
                     f"{_fmt(day['bytes_per_run'] / 1024, 1)} KiB of Dagster storage per run, measured):")
        for name in ("per_batch", "coalesced"):
            parts.append(f"  {name}: {_fmt(day[name]['runs'])} runs/day, "
                         f"{_fmt(day[name]['storage_mib_per_day'], 0)} MiB/day")
    if result.get("targets"):
        parts.append("\ntargets")
        for k, t in result["targets"].items():
            met = "not measured" if t.get("met") is None else ("met" if t["met"] else "NOT met")
            parts.append(f"  {k}: {_fmt(t.get('value'))} (limit {_fmt(t.get('limit'))}) {met}")
    return "\n".join(parts)


def scaling_figure(result: dict[str, Any]):  # -> matplotlib.figure.Figure
    """Log-log time against trades: ingest, each asset, the pass, the floor, and the naive baselines."""
    from matplotlib.figure import Figure

    sizes = sorted(result["sizes"], key=lambda s: s["n_trades"])
    n = np.array([s["n_trades"] for s in sizes], dtype=float)
    fig = Figure(figsize=(9, 6))
    ax = fig.subplots()
    series: dict[str, tuple[list[float], dict]] = {
        "ingest": ([s["ingest"]["wall_s"] for s in sizes], {"color": "black", "lw": 2}),
        "learning pass": ([s["learning_pass"]["wall_s"] for s in sizes], {"color": "tab:red", "lw": 2.5}),
        "floor": ([s["floor"]["wall_s"] for s in sizes], {"color": "gray", "lw": 2, "ls": "--"}),
    }
    for i, name in enumerate(sizes[0]["assets"]):
        series[name] = ([s["assets"][name]["wall_s"] for s in sizes], {"color": f"C{i}", "lw": 1.2})
    for name, (times, style) in series.items():
        k = result.get("exponents", {}).get("learning_pass" if name == "learning pass" else name)
        label = name + (f" (k={k:.2f})" if k is not None else "")
        ax.plot(n, times, marker="o", label=label, **style)
    for name in sizes[0].get("naive", {}):
        pts = [(s["n_trades"], s["naive"][name]["naive_s"]) for s in sizes if s.get("naive", {}).get(name, {}).get("naive_s")]
        if pts:
            ax.plot(*zip(*pts), marker="x", ls=":", lw=1, label=f"naive {name}")
    if len(n) >= 1:
        ref = n / n[0]
        base = series["learning pass"][0][0]
        ax.plot(n, base * ref, color="tab:red", lw=0.6, ls=":", label="∝ trades (k=1)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("trades in the domain")
    ax.set_ylabel("wall time (s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("meta-pipeline bench: time against size (log-log)")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------
# Worker side: measurement helpers (run inside fresh processes)
# ---------------------------------------------------------------------------


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-memory high-water mark of this process (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _status_kib(field_name: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mib() -> float:
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def rss_mib() -> float:
    now = _status_kib("VmRSS")
    return (now or 0.0) / 1024.0


MEMORY_METHOD = (
    "peak resident set size of the worker process while the stage ran: the kernel high-water mark VmHWM, "
    "reset at the start of each stage via /proc/self/clear_refs (each stage runs in a fresh process; "
    "the figure includes the interpreter and imports, ~150-250 MiB)."
)


@contextmanager
def measured() -> Iterator[dict[str, float]]:
    """Wall time, CPU time (this process) and peak RSS of the block."""
    out: dict[str, float] = {}
    _reset_peak_rss()
    out["rss_before_mib"] = rss_mib()
    w, c = time.perf_counter(), time.process_time()
    yield out
    out["wall_s"] = time.perf_counter() - w
    out["cpu_s"] = time.process_time() - c
    out["peak_rss_mib"] = peak_rss_mib()
    out["load_1m"] = _loadavg()[0] if _loadavg() else None  # the machine's load when the timing ended


def _store(db_path: str):
    from meta_pipeline.store import MetaStore

    return MetaStore(db_url=f"sqlite:///{db_path}")


def _fresh_db(db_path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        p = Path(db_path + suffix)
        if p.exists():
            p.unlink()


# -- setup --------------------------------------------------------------------


def work_setup(args: dict[str, Any]) -> dict[str, Any]:
    """Generate the synthetic fleet and write each domain's trades as a CSV in the ingest contract."""
    from meta_pipeline.lab.synth import FleetConfig, generate_fleet, write_trades_file

    folder = Path(args["folder"])
    names = tuple(args["domains"])
    t = time.perf_counter()
    fleet = generate_fleet(FleetConfig(n_domains=len(names), n_trades=int(args["n_trades"]), seed=int(args["seed"]),
                                       telemetry_ticks=10, domain_names=names))
    generated = time.perf_counter() - t
    files = {}
    for name, data in fleet.domains.items():
        files[name] = str(write_trades_file(data.trades, folder / name / "trades.csv"))
    return {"files": files, "generate_s": generated, "write_s": time.perf_counter() - t - generated}


# -- ingest -------------------------------------------------------------------


def work_ingest(args: dict[str, Any]) -> dict[str, Any]:
    """Ingest each domain's CSV through ingest_file (into a fresh database file); the 1-minute load
    average at its start and end is recorded with it (the machine may be shared)."""
    from meta_pipeline.ingest import ingest_file

    if args.get("fresh", True):
        _fresh_db(args["db"])
    store = _store(args["db"])
    store.count("trades")  # create the schema outside the timing
    per_domain = {}
    with measured() as total:
        for domain, path in args["files"].items():
            with measured() as m:
                report = ingest_file(store, "trades", path, domain)
            m.update(ingested=report.ingested, quarantined=report.quarantined)
            per_domain[domain] = m
    rows = {t: store.count(t) for t in ("trades", "trade_patterns", "trade_scope", "trade_metrics")}
    return {**total, "per_domain": per_domain, "rows": rows, "load": _loadavg()}


def work_ingest_floor(args: dict[str, Any]) -> dict[str, Any]:
    """The ingest floor: the file read by the fastest reader there is (pyarrow's multi-threaded CSV
    reader, typed columns) and the same rows shaped into the four source tables (vectorized:
    patterns split, scope and metric columns melted) and bulk-inserted into the same schema in
    one transaction — no validation, no quarantine, no line numbers, no bounded memory."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pa_csv

    from meta_pipeline.contracts import table
    from meta_pipeline.store.frames import insert_frame

    _fresh_db(args["db"])
    store = _store(args["db"])
    store.count("trades")  # the schema, outside the timing
    out: dict[str, Any] = {}
    with measured() as total:
        for domain, path in args["files"].items():
            t = time.perf_counter()
            header = Path(path).open(encoding="utf-8").readline().strip().split(",")
            types = {c: pa.float64() if c == "return_r" or c.startswith("metric.") else
                     pa.timestamp("us", tz="UTC") if c == "closed_at" else pa.string() for c in header}
            data = pa_csv.read_csv(path, convert_options=pa_csv.ConvertOptions(column_types=types))
            out["read_s"] = time.perf_counter() - t
            t = time.perf_counter()
            n = data.num_rows
            ids = data.column("trade_id").combine_chunks()
            trades = pd.DataFrame({
                "domain": domain, "trade_id": ids.to_numpy(zero_copy_only=False),
                "closed_at": data.column("closed_at").to_pandas(), "regime": data.column("regime").to_pandas(),
                "strategy_id": (data.column("strategy_id").to_pandas() if "strategy_id" in header else "default"),
                "return_r": data.column("return_r").to_numpy(), "source_file": str(path),
                "ingested_at": pd.Timestamp.now(tz="UTC")})
            lists = pc.split_pattern(data.column("patterns").combine_chunks(), "|")
            parents = pc.list_parent_indices(lists)
            patterns = pd.DataFrame({"domain": domain, "trade_id": ids.take(parents).to_numpy(zero_copy_only=False),
                                     "pattern": pc.list_flatten(lists).to_numpy(zero_copy_only=False)})
            long: dict[str, list[pd.DataFrame]] = {"trade_scope": [], "trade_metrics": []}
            for c in header:
                if c.startswith("scope."):
                    col = data.column(c).combine_chunks()
                    keep = pc.and_(pc.is_valid(col), pc.not_equal(col, ""))
                    long["trade_scope"].append(pd.DataFrame({
                        "domain": domain, "trade_id": ids.filter(keep).to_numpy(zero_copy_only=False), "key": c[6:],
                        "value": col.filter(keep).to_numpy(zero_copy_only=False)}))
                elif c.startswith("metric."):
                    col = data.column(c).combine_chunks()
                    keep = pc.is_valid(col)
                    long["trade_metrics"].append(pd.DataFrame({
                        "domain": domain, "trade_id": ids.filter(keep).to_numpy(zero_copy_only=False),
                        "metric": c[7:], "value": col.filter(keep).to_numpy(zero_copy_only=False)}))
            del data
            out["shape_s"] = time.perf_counter() - t
            t = time.perf_counter()
            with store.write() as conn:
                rows = insert_frame(conn, table("trades"), trades)
                rows += insert_frame(conn, table("trade_patterns"), patterns)
                for name, parts in long.items():
                    if parts:
                        rows += insert_frame(conn, table(name), pd.concat(parts, ignore_index=True))
            out["insert_s"] = time.perf_counter() - t
            out["rows"] = rows + 0 * n
    return {**total, **out}


# -- controller runs and Dagster storage per simulated day ----------------------

SOAK_BATCHES_PER_MIN = 25.0 / 3  # per domain: the 15-minute soak's rate (3 domains, ~25 telemetry batches a minute)
SENSOR_TICK_S = 15.0  # new_telemetry_sensor's minimum_interval_seconds


def simulate_controller_day(domains: int, batches_per_min: float, coalesce_s: float,
                            tick_s: float = SENSOR_TICK_S, run_s: float = 5.0) -> dict[str, float]:
    """Controller runs in one simulated day: batches land evenly at ``batches_per_min`` per domain,
    the sensor ticks every ``tick_s``; a domain with a batch not yet covered by a requested run gets
    a run when ``automation.run_due`` says so (``coalesce_s`` 0: one run per tick with new batches,
    as before coalescing); a run covers every batch landed before it starts (``run_s`` after its
    request). All domains alike, so one is simulated and multiplied."""
    from meta_pipeline.defs.automation import run_due

    gap = 60.0 / batches_per_min
    arrivals = np.arange(gap / 2, 86_400.0, gap)
    covered_until, last_request, runs, k = -1.0, None, 0, 0
    for now in np.arange(0.0, 86_400.0, tick_s):
        while k < len(arrivals) and arrivals[k] <= now:
            k += 1
        newest = arrivals[k - 1] if k else None
        if newest is None or newest <= covered_until:
            continue  # nothing pending: no run
        if not run_due(float(now), last_request, coalesce_s):
            continue
        runs += 1
        last_request = float(now)
        covered_until = float(now) + run_s
    return {"runs_per_domain": float(runs), "runs": float(runs * domains),
            "batches_per_domain": float(len(arrivals))}


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def work_controller_runs(args: dict[str, Any]) -> dict[str, Any]:
    """Dagster storage one controller run costs: ``controller_job`` executed ``runs`` times for one
    domain (a telemetry batch landed before each), on a fresh SQLite instance; bytes of the
    instance folder (runs, event log, schedules) before and after."""
    folder = Path(args["folder"])
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.environ["META_PIPELINE_DB_URL"] = f"sqlite:///{folder / 'meta.db'}"
    import dagster as dg

    from meta_pipeline.ingest import ingest_file
    from meta_pipeline.lab.synth import FleetConfig, generate_fleet, write_telemetry_file, write_trades_file
    from meta_pipeline.store import MetaStore

    store = MetaStore(os.environ["META_PIPELINE_DB_URL"])
    n_runs = int(args.get("runs", 6))
    fleet = generate_fleet(FleetConfig(n_domains=1, n_trades=2000, telemetry_ticks=40 + 10 * n_runs, seed=3,
                                       domain_names=(DOMAIN,)))
    data = fleet.domains[DOMAIN]
    ingest_file(store, "trades", write_trades_file(data.trades, folder / "t.csv"), DOMAIN)
    ingest_file(store, "telemetry", write_telemetry_file(data.telemetry.iloc[:40], folder / "m.csv"), DOMAIN)
    import meta_pipeline.definitions as repo

    job = repo.defs.resolve_job_def("controller_job")
    home = folder / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        instance.add_dynamic_partitions("domain", [DOMAIN])
        job.execute_in_process(partition_key=DOMAIN, instance=instance, raise_on_error=False)  # warm: schema, first run
        before = _tree_bytes(home)
        ok = 0
        t = time.perf_counter()
        for i in range(n_runs):
            batch = write_telemetry_file(data.telemetry.iloc[40 + 10 * i: 50 + 10 * i], folder / f"m{i}.csv")
            ingest_file(store, "telemetry", batch, DOMAIN)
            ok += job.execute_in_process(partition_key=DOMAIN, instance=instance, raise_on_error=False).success
        wall = time.perf_counter() - t
        after = _tree_bytes(home)
    return {"runs": n_runs, "ok": ok, "bytes_per_run": (after - before) / n_runs, "run_wall_s": wall / n_runs}


def controller_day(per_run: dict[str, Any], domains: int = 100, coalesce_s: float | None = None) -> dict[str, Any]:
    """Runs and Dagster storage per simulated day at ``domains`` domains under the soak's telemetry rate,
    one run per batch (before) against coalesced (``controller_coalesce_seconds``)."""
    from meta_pipeline.defs.automation import controller_coalesce_seconds

    coalesce_s = controller_coalesce_seconds() if coalesce_s is None else coalesce_s
    out: dict[str, Any] = {"domains": domains, "batches_per_min_per_domain": SOAK_BATCHES_PER_MIN,
                           "sensor_tick_s": SENSOR_TICK_S, "coalesce_s": coalesce_s,
                           "bytes_per_run": per_run["bytes_per_run"], "measured_runs": per_run["runs"],
                           "measured_ok": per_run["ok"]}
    for name, interval in (("per_batch", 0.0), ("coalesced", coalesce_s)):
        day = simulate_controller_day(domains, SOAK_BATCHES_PER_MIN, interval)
        out[name] = {**day, "storage_mib_per_day": day["runs"] * per_run["bytes_per_run"] / MIB}
    return out


# -- the learning pass ----------------------------------------------------------


def learning_asset_defs() -> list[Any]:
    """The learning assets in the order a run materializes them (topological)."""
    import dagster as dg

    import meta_pipeline.definitions as repo

    graph = repo.defs.resolve_asset_graph()
    keys = dg.AssetSelection.groups("learning").resolve(graph)
    # the asset objects as defined (the repository's Definitions binds its own store; the bench supplies one)
    raw = dg.load_from_defs_folder(path_within_project=Path(repo.__file__).parent)
    by_key = {k: a for a in raw.assets or [] if isinstance(a, dg.AssetsDefinition) for k in a.keys}
    return [by_key[k] for k in graph.toposorted_asset_keys if k in keys]


def run_learning_pass(store: Any, domain: str, instance: Any, assets: list[Any]) -> dict[str, Any]:
    """Every learning asset for one domain, through the asset functions, in one resource scope.

    One context for all assets: Dagster initializes the store resource once (a MetaStore
    with a fresh read cache), exactly as one in-process run does.
    """
    import dagster as dg

    from meta_pipeline.defs.resources import StoreResource

    out: dict[str, Any] = {"assets": {}}
    with measured() as total:
        with dg.build_asset_context(partition_key=domain, resources={"store": StoreResource(db_url=store.db_url)},
                                    instance=instance) as ctx:
            for asset in assets:
                name = asset.key.to_user_string()
                with measured() as m:
                    result = asset(ctx)
                rows = (result.metadata or {}).get("dagster/row_count") if result is not None else None
                m["rows"] = int(getattr(rows, "value", rows)) if rows is not None else None
                out["assets"][name] = m
            cache = ctx.resources.store.read_cache
            out["cache"] = ({"hits": cache.hits, "misses": cache.misses, "memo_hits": cache.memo_hits}
                            if cache is not None else {"hits": 0, "misses": 0, "memo_hits": 0})
    out["pass"] = total
    return out


def work_learning(args: dict[str, Any]) -> dict[str, Any]:
    """The learning pass for each domain (repeated), one after the other in this process."""
    import dagster as dg

    store = _store(args["db"])
    assets = learning_asset_defs()
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("domain", list(args["domains"]))
    runs = []
    with measured() as total:
        for _ in range(int(args.get("repeat", 1))):
            for domain in args["domains"]:
                runs.append({"domain": domain, **run_learning_pass(store, domain, instance, assets)})
    return {"runs": runs, **total}


# -- the floor ------------------------------------------------------------------

def source_columns() -> dict[str, list[str]]:
    """The columns of each source table the learning assets read (the floor reads the same)."""
    from meta_pipeline.defs.learning.assets import SOURCE_COLUMNS, TRADE_COLUMNS

    return {"trades": list(TRADE_COLUMNS), **{k: list(v) for k, v in SOURCE_COLUMNS.items()}}


def floor_pass(store: Any, domain: str, incidence: Any) -> dict[str, float]:
    """Read the four source tables once (no cache) and one groupby over the lesson×trade rows."""
    import pandas as pd

    with measured() as m:
        t = time.perf_counter()
        frames = {name: store.read(name, domain=domain, columns=cols) for name, cols in source_columns().items()}
        m["read_s"] = time.perf_counter() - t
        t = time.perf_counter()
        y = frames["trades"]["return_r"].to_numpy(dtype=float)
        pairs = pd.DataFrame({"lesson_idx": incidence["lesson_idx"].to_numpy(),
                              "y": y[incidence["trade_idx"].to_numpy()]})
        stats = pairs.groupby("lesson_idx")["y"].agg(["count", "mean", "std"])
        m["groupby_s"] = time.perf_counter() - t
    m["incidence_rows"] = int(len(incidence))
    m["groups"] = int(len(stats))
    return m


def work_floor(args: dict[str, Any]) -> dict[str, Any]:
    """The floor for one domain, repeated; the lesson×trade rows are built first, outside the timing."""
    from meta_pipeline.learning import lessons as lessons_core

    store = _store(args["db"])
    domain = args["domain"]
    cols = source_columns()
    trades = store.read("trades", domain=domain, columns=cols["trades"], order_by="closed_at, trade_id")
    patterns = store.read("trade_patterns", domain=domain, columns=cols["trade_patterns"])
    scope = store.read("trade_scope", domain=domain, columns=cols["trade_scope"])
    _, incidence = lessons_core.mine_lessons(trades.reset_index(drop=True), patterns, scope)
    del trades, patterns, scope
    return {"runs": [floor_pass(store, domain, incidence) for _ in range(int(args.get("repeat", 1)))]}


# -- naive baselines --------------------------------------------------------------


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    value = fn()
    return time.perf_counter() - t, value


def _best_of(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, value = math.inf, None
    for _ in range(max(1, repeat)):
        t, value = _timed(fn)
        best = min(best, t)
    return best, value


def naive_curve_fit(history: Any, lesson_keys: Sequence[str]) -> dict[str, tuple[float, float]]:
    """The naive half-life fit: scipy's curve_fit, one lesson at a time (same model and weights as ours).

    edge(t) = e0·exp(−λ t) on bucket midpoints, sigma = 1/sqrt(n); returns lesson → (e0, λ).
    """
    import warnings

    import pandas as pd
    from scipy.optimize import OptimizeWarning, curve_fit

    def model(t: np.ndarray, e0: float, lam: float) -> np.ndarray:
        return e0 * np.exp(-lam * t)

    out = {}
    hours = pd.Timedelta(hours=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        for key in lesson_keys:  # the baseline *is* a loop
            h = history[history["lesson_key"] == key]
            if len(h) < 3:
                continue
            t = ((h["bucket_start"] - h["bucket_start"].min()) / hours).to_numpy(float) + 12.0
            y = h["edge_mean"].to_numpy(float)
            sigma = 1.0 / np.sqrt(h["n"].to_numpy(float))
            p0 = (float(np.average(y, weights=1 / sigma**2)), 1.0 / max(float(t.max()), 1.0))
            try:
                popt, _ = curve_fit(model, t, y, p0=p0, sigma=sigma, maxfev=5000)
            except (RuntimeError, ValueError):
                continue
            out[key] = (float(popt[0]), float(popt[1]))
    return out


def decay_rate_agreement(naive: dict[str, tuple[float, float]], ours: Any, history: Any) -> str:
    """How many lessons get the same decay rate from curve_fit and from our vectorized fit.

    Same: within 1% relative, or within 1% of one e-fold over the lesson history's span
    (a rate near zero has no meaningful relative error). Lessons curve_fit gave up on
    are counted as not compared.
    """
    span_hours = max(float((history["bucket_start"].max() - history["bucket_start"].min()) / np.timedelta64(1, "h")), 1.0)
    ours_rate = ours.set_index("lesson_key")["decay_rate_per_hour"]
    keys = [k for k in naive if k in ours_rate.index and np.isfinite(ours_rate[k])]
    if not keys:
        return "none compared"
    a = np.array([naive[k][1] for k in keys])
    b = ours_rate.loc[keys].to_numpy(float)
    close = np.isclose(a, b, rtol=0.01, atol=0.01 / span_hours)
    text = f"rate same on {int(close.sum())}/{len(keys)}"
    differ = [k for k, c in zip(keys, close) if not c]
    if differ:  # which fit is better there: the weighted SSE each rate leaves (e0 at its optimum)
        ours_better = sum(_profile_sse(history, k, float(ours_rate[k])) <= _profile_sse(history, k, naive[k][1]) * (1 + 1e-9)
                          for k in differ)
        text += f"; ours fits better on {ours_better}/{len(differ)} others"
    return text


def _profile_sse(history: Any, key: str, rate: float) -> float:
    """Weighted SSE of edge(t) = e0·exp(−rate·t) on one lesson's buckets, e0 in closed form (weights n)."""
    h = history[history["lesson_key"] == key]
    t = ((h["bucket_start"] - h["bucket_start"].min()) / np.timedelta64(1, "h")).to_numpy(float) + 12.0
    y, w = h["edge_mean"].to_numpy(float), h["n"].to_numpy(float)
    x = np.exp(np.clip(-rate * t, -700, 700))
    e0 = float(np.sum(w * x * y) / max(float(np.sum(w * x * x)), 1e-300))
    return float(np.sum(w * (y - e0 * x) ** 2))


def _extrapolated(run: Callable[[int], float], n_total: int, budget_s: float, power: float,
                  first: int = 20) -> tuple[float, str]:
    """Time `run(k)` (cost ∝ k^power) on a growing sample until the full size fits the budget or a sample is big enough.

    Returns (seconds for n_total, how it was obtained).
    """
    k = min(first, n_total)
    while True:
        t = max(run(k), 1e-6)
        predicted_full = t * (n_total / k) ** power
        if k == n_total:
            return t, f"all {n_total}"
        if predicted_full <= budget_s:
            k = n_total
            continue
        if t >= min(5.0, budget_s / 4) or k * 2 > n_total:
            return predicted_full, f"{k} of {n_total}, extrapolated ∝ n^{power:g}"
        k = min(n_total, k * 2)


def work_naive(args: dict[str, Any]) -> dict[str, Any]:
    """Naive baselines against our cores, on the same in-memory inputs read from the store."""
    import pandas as pd

    from meta_pipeline.learning import factors as factors_core
    from meta_pipeline.learning import halflife as halflife_core
    from meta_pipeline.learning import lessons as lessons_core
    from meta_pipeline.lab import naive as naive_core
    from meta_pipeline.learning import overrides as overrides_core

    store = _store(args["db"])
    domain = args["domain"]
    budget = float(args.get("budget_s", 60.0))
    repeat = int(args.get("repeat", 1))
    cols = source_columns()
    trades = store.read("trades", domain=domain, columns=cols["trades"], order_by="closed_at, trade_id").reset_index(drop=True)
    patterns = store.read("trade_patterns", domain=domain, columns=cols["trade_patterns"])
    scope = store.read("trade_scope", domain=domain, columns=cols["trade_scope"])
    metrics = store.read("trade_metrics", domain=domain, columns=cols["trade_metrics"])
    lessons = store.read("learning_lessons", domain=domain)
    history = store.read("learning_edge_history", domain=domain)
    fits = store.read("half_life_fits", domain=domain)
    factors = store.read("latent_factors", domain=domain)
    weights = store.read("learning_regime_weights", domain=domain)
    knobs = store.knobs_in_effect(domain).values
    now = trades["closed_at"].max()
    out: dict[str, Any] = {}

    # half-lives: one vectorized fit of all lessons vs curve_fit per lesson
    keys = sorted(history["lesson_key"].unique().tolist())
    ours_s, ours_fit = _best_of(lambda: halflife_core.fit_half_lives(history), repeat)
    rng = np.random.default_rng(0)
    order = [keys[i] for i in rng.permutation(len(keys))]
    naive_fits: dict[str, tuple[float, float]] = {}

    def naive_half_lives(k: int) -> float:
        t, result = _timed(lambda: naive_curve_fit(history, order[:k]))
        if k >= len(keys):
            naive_fits.update(result)
        return t

    naive_s, how = _extrapolated(naive_half_lives, len(keys), budget, 1.0)
    out["half_life_fits"] = {"baseline": "scipy curve_fit per lesson", "naive_s": naive_s, "ours_s": ours_s,
                             "speedup": ratio(naive_s, ours_s), "how": how, "lessons": len(keys),
                             "agreement": decay_rate_agreement(naive_fits, ours_fit, history) if naive_fits else ""}

    # latent factors: sparse co-occurrence product vs pairwise Python-set Jaccard
    ordered = lessons.sort_values("lesson_key").reset_index(drop=True)
    incidence = lessons_core.match_lessons(ordered, trades, patterns, scope)
    n_trades = len(trades)
    ours_s, ours_factors = _best_of(lambda: factors_core.find_latent_factors(ordered, incidence, n_trades), repeat)

    def naive_factors(k: int) -> float:
        pick = np.sort(rng.permutation(len(ordered))[:k]) if k < len(ordered) else np.arange(len(ordered))
        sub = ordered.iloc[pick].reset_index(drop=True)
        remap = np.full(len(ordered), -1, dtype=np.int64)
        remap[pick] = np.arange(len(pick))
        li = remap[incidence["lesson_idx"].to_numpy()]
        keep = li >= 0
        sub_inc = pd.DataFrame({"lesson_idx": li[keep], "trade_idx": incidence["trade_idx"].to_numpy()[keep]})
        t, result = _timed(lambda: naive_core.naive_latent_factors(sub, sub_inc, n_trades))
        if k >= len(ordered):
            naive_factors.full_result = result  # type: ignore[attr-defined]
        return t

    naive_s, how = _extrapolated(naive_factors, len(ordered), budget, 2.0)
    agreement = ""
    full = getattr(naive_factors, "full_result", None)
    if full is not None:
        same = full.set_index("lesson_key")["latent_factor_id"].sort_index().equals(
            ours_factors.set_index("lesson_key")["latent_factor_id"].sort_index())
        agreement = "yes" if same else "no"
    out["latent_factors"] = {"baseline": "pairwise Python-set Jaccard/containment", "naive_s": naive_s, "ours_s": ours_s,
                             "speedup": ratio(naive_s, ours_s), "how": how, "lessons": len(ordered),
                             "agreement": agreement}

    # overrides: joint fit over all factors vs one lesson at a time
    def ours_overrides() -> Any:
        return overrides_core.materialize_overrides(lessons, fits, factors, weights, trades, patterns, scope, metrics,
                                                    knobs=knobs, now=now)

    ours_s, _ = _best_of(ours_overrides, repeat)
    naive_s, how = _extrapolated(
        lambda k: _timed(lambda: naive_core.naive_overrides(lessons.iloc[:k], fits, trades, patterns, scope,
                                                            knobs=knobs, now=now))[0],
        len(lessons), budget, 1.0)
    out["pm_overrides"] = {"baseline": "per-lesson override loop (filter, mean, decay)", "naive_s": naive_s,
                           "ours_s": ours_s, "speedup": ratio(naive_s, ours_s), "how": how, "lessons": len(lessons),
                           # the loop is the old materializer (every lesson's own decayed mean), not our joint fit
                           "agreement": "n/a: another model"}
    return out


# -- worker entry point -----------------------------------------------------------------

WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "setup": work_setup,
    "ingest_floor": work_ingest_floor,
    "controller_runs": work_controller_runs,
    "ingest": work_ingest,
    "learning": work_learning,
    "floor": work_floor,
    "naive": work_naive,
}
RESULT_MARK = "BENCH_RESULT "


def worker_main(argv: Sequence[str]) -> int:
    """`python -m meta_pipeline.lab.bench worker STAGE ARGS_JSON`: run one stage, print its JSON result."""
    stage, payload = argv[0], json.loads(argv[1])
    import warnings

    warnings.filterwarnings("ignore")
    result = WORKERS[stage](payload)
    print(RESULT_MARK + json.dumps(result, default=_json_default), flush=True)
    return 0


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serializable: {type(v)}")


# ---------------------------------------------------------------------------
# Parent side: run workers, assemble the result
# ---------------------------------------------------------------------------


class BenchError(RuntimeError):
    pass


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DAGSTER_TELEMETRY_ENABLED", "false")
    # the bench must measure this checkout, whatever the current directory
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def start_worker(stage: str, args: dict[str, Any], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = log.open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "meta_pipeline.lab.bench", "worker", stage, json.dumps(args, default=_json_default)],
        stdout=subprocess.PIPE, stderr=fh, text=True, env=_worker_env(),
    )


def finish_worker(proc: subprocess.Popen, stage: str, log: Path) -> dict[str, Any]:
    stdout, _ = proc.communicate()
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            if proc.returncode == 0:
                return json.loads(line[len(RESULT_MARK):])
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise BenchError(f"bench worker {stage!r} failed (exit {proc.returncode}); log {log}:\n{tail}")


def run_worker(stage: str, args: dict[str, Any], log: Path, in_process: bool = False) -> dict[str, Any]:
    """One stage in a fresh Python process (or, for tests, in this one); its JSON result."""
    if in_process:
        return json.loads(json.dumps(WORKERS[stage](args), default=_json_default))
    return finish_worker(start_worker(stage, args, log), stage, log)


def _say(progress: Callable[[str], None] | None, text: str) -> None:
    if progress is not None:
        progress(text)


def bench_size(n_trades: int, work: Path, opts: BenchOptions, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Everything measured for one domain of `n_trades` trades."""
    label = _trades_label(n_trades)
    folder = work / label
    db = str(folder / "bench.db")
    logs = folder / "logs"
    def stage(name: str, args: dict[str, Any], log: str) -> dict[str, Any]:
        return run_worker(name, args, logs / log, opts.workers_in_process)

    _say(progress, f"[{label}] generating {n_trades:,} synthetic trades")
    setup = stage("setup", {"folder": str(folder / "files"), "domains": [DOMAIN], "n_trades": n_trades,
                            "seed": opts.seed}, "setup.log")
    files = setup["files"]
    ingests = []
    for r in range(opts.repeat):
        _say(progress, f"[{label}] ingest {r + 1}/{opts.repeat}")
        ingests.append(stage("ingest", {"db": db, "files": files}, f"ingest{r}.log"))
    _say(progress, f"[{label}] ingest floor (fastest reader + one bulk insert)")
    ingest_floor = stage("ingest_floor", {"db": db + ".floor", "files": files}, "ingest_floor.log")
    _fresh_db(db + ".floor")
    _say(progress, f"[{label}] learning pass ×{opts.repeat}")
    learning = stage("learning", {"db": db, "domains": [DOMAIN], "repeat": opts.repeat}, "learning.log")
    _say(progress, f"[{label}] floor")
    floor = stage("floor", {"db": db, "domain": DOMAIN, "repeat": opts.repeat}, "floor.log")
    naive: dict[str, Any] = {}
    if opts.naive:
        _say(progress, f"[{label}] naive baselines")
        naive = stage("naive", {"db": db, "domain": DOMAIN, "budget_s": opts.naive_budget_s, "repeat": opts.repeat},
                      "naive.log")

    runs = learning["runs"]
    assets = {name: summarize_runs([r["assets"][name] for r in runs]) for name in runs[0]["assets"]}
    for name in assets:
        assets[name]["rows"] = runs[-1]["assets"][name]["rows"]
    learning_pass = summarize_runs([r["pass"] for r in runs])
    floor_summary = summarize_runs(floor["runs"])
    floor_summary.update({k: float(np.median([r[k] for r in floor["runs"]])) for k in ("read_s", "groupby_s")})
    floor_summary["incidence_rows"] = floor["runs"][0]["incidence_rows"]
    size: dict[str, Any] = {
        "n_trades": n_trades,
        "domain": DOMAIN,
        "setup": {"generate_s": setup["generate_s"], "write_s": setup["write_s"]},
        "rows": ingests[-1]["rows"],
        "source_rows": int(sum(ingests[-1]["rows"].values())),
        "ingest": summarize_runs(ingests),
        "ingest_floor": {k: ingest_floor[k] for k in ("wall_s", "cpu_s", "peak_rss_mib", "read_s", "shape_s",
                                                       "insert_s", "rows")},
        "ingest_floor_ratio": ratio(median_of(ingests, "wall_s"), ingest_floor["wall_s"]),
        "load_at_ingest": ingests[-1].get("load"),
        "assets": assets,
        "learning_pass": learning_pass,
        "cache": runs[-1]["cache"],
        "floor": floor_summary,
        "floor_ratio": ratio(learning_pass["wall_s"], floor_summary["wall_s"]),
        "floor_ratio_cpu": ratio(learning_pass["cpu_s"], floor_summary["cpu_s"]),
        "naive": naive,
    }
    if opts.dagster:
        size["dagster"] = bench_dagster(db, folder, n_trades, opts, progress)
    if opts.cli and n_trades <= opts.cli_max_trades and not opts.workers_in_process:
        _say(progress, f"[{label}] the CLI path: meta-pipeline ingest + dagster asset materialize --select group:learning")
        size["cli"] = bench_cli(files[DOMAIN], folder / "cli", progress)
    if not opts.keep_data:
        shutil.rmtree(folder / "files", ignore_errors=True)
        _fresh_db(db)
    return size


# -- Dagster ------------------------------------------------------------------------

DAGSTER_YAML = "telemetry:\n  enabled: false\n"

MULTIPROCESS_DEFS = '''"""Test-only code location: the repository's definitions with the multiprocess executor.

definitions.py pins the in-process executor, so run config cannot switch it; the bench
measures the alternative through this file (`dagster ... -f`).
"""
from pathlib import Path

import dagster as dg

import meta_pipeline.definitions as repo
from meta_pipeline.defs.resources import STORE_KEY, StoreResource

defs = dg.Definitions.merge(
    dg.load_from_defs_folder(path_within_project=Path(repo.__file__).parent),
    dg.Definitions(resources={STORE_KEY: StoreResource()}, executor=dg.multiprocess_executor.configured(%s)),
)
'''


def _dagster_cli() -> list[str]:
    script = Path(sys.executable).parent / "dagster"
    return [str(script)] if script.exists() else [sys.executable, "-m", "dagster"]


def bench_dagster(db: str, folder: Path, n_trades: int, opts: BenchOptions,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Wall time of `dagster asset materialize` for the learning group, per executor, in a fresh instance."""
    home = folder / "dagster_home"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    env = _worker_env()
    env.update({"DAGSTER_HOME": str(home), "META_PIPELINE_DB_URL": f"sqlite:///{db}"})
    register = ("import dagster as dg; i = dg.DagsterInstance.get(); "
                f"i.add_dynamic_partitions('domain', [{DOMAIN!r}])")
    subprocess.run([sys.executable, "-c", register], env=env, check=True, capture_output=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import meta_pipeline.definitions"], env=env, check=True, capture_output=True)
    import_s = time.perf_counter() - t
    select = ["asset", "materialize", "--select", "group:learning", "--partition", DOMAIN]
    variants: dict[str, list[str] | None] = {"dagster, in-process executor (the repository's)": ["-m", "meta_pipeline.definitions"]}
    for name, config in (("dagster, multiprocess executor (spawn)", "{}"),
                         ("dagster, multiprocess executor (forkserver)", "{'start_method': {'forkserver': {}}}")):
        if n_trades <= opts.dagster_multiprocess_max_trades:
            path = folder / f"bench_defs_{'forkserver' if 'forkserver' in name else 'spawn'}.py"
            path.write_text(MULTIPROCESS_DEFS % config)
            variants[name] = ["-f", str(path)]
        else:
            variants[name] = None
    runs: dict[str, Any] = {}
    for name, location in variants.items():
        if location is None:
            runs[name] = {"skipped": f"skipped above {opts.dagster_multiprocess_max_trades:,} trades "
                                     "(every step re-reads the source tables in its own process)"}
            continue
        _say(progress, f"[{_trades_label(n_trades)}] {name}")
        t = time.perf_counter()
        proc = subprocess.run([*_dagster_cli(), *select, *location], env=env, capture_output=True, text=True,
                              cwd=str(folder))
        wall = time.perf_counter() - t
        (folder / "logs").mkdir(parents=True, exist_ok=True)
        (folder / "logs" / f"dagster_{len(runs)}.log").write_text(proc.stdout + proc.stderr)
        runs[name] = {"wall_s": wall, "ok": proc.returncode == 0, "returncode": proc.returncode}
    return {"runs": runs, "import_s": import_s}


def _run_child(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> dict[str, Any]:
    """Run one command as a fresh process: wall time from before its start to its exit, its own peak RSS."""
    t = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=str(cwd), stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": time.perf_counter() - t, "peak_rss_mib": usage.ru_maxrss / 1024.0,
            "ok": proc.returncode == 0, "returncode": proc.returncode}


def bench_cli(file: str, folder: Path, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """What a user runs, timed from process start: ``meta-pipeline ingest trades FILE --domain D`` into a
    fresh store and Dagster instance, then ``dagster asset materialize --select group:learning
    --partition D -m meta_pipeline.definitions`` (the repository's in-process executor)."""
    shutil.rmtree(folder, ignore_errors=True)
    home = folder / "dagster_home"
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    env = _worker_env()
    env.update({"DAGSTER_HOME": str(home), "META_PIPELINE_DB_URL": f"sqlite:///{folder / 'cli.db'}"})
    cli = Path(sys.executable).parent / "meta-pipeline"
    ingest_cmd = [str(cli)] if cli.exists() else [sys.executable, "-m", "meta_pipeline.cli"]
    ingest = _run_child([*ingest_cmd, "ingest", "trades", file, "--domain", DOMAIN], env, folder,
                        folder / "ingest.log")
    learn = _run_child([*_dagster_cli(), "asset", "materialize", "--select", "group:learning", "--partition", DOMAIN,
                        "-m", "meta_pipeline.definitions"], env, folder, folder / "materialize.log")
    for name in ("cli.db", "cli.db-wal", "cli.db-shm"):
        (folder / name).unlink(missing_ok=True)
    return {"ingest": ingest, "materialize": learn, "wall_s": ingest["wall_s"] + learn["wall_s"],
            "peak_rss_mib": max(ingest["peak_rss_mib"], learn["peak_rss_mib"]), "ok": ingest["ok"] and learn["ok"]}


# -- the fleet ------------------------------------------------------------------------


def bench_fleet(tier: Tier, work: Path, opts: BenchOptions, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """A fleet of small domains: ingest all, learn all sequentially, then as two concurrent processes."""
    folder = work / f"fleet{tier.fleet_domains}x{_trades_label(tier.fleet_trades)}"
    db = str(folder / "fleet.db")
    logs = folder / "logs"
    domains = [f"fleet{i:02d}" for i in range(tier.fleet_domains)]
    def stage(name: str, args: dict[str, Any], log: str) -> dict[str, Any]:
        return run_worker(name, args, logs / log, opts.workers_in_process)

    _say(progress, f"[fleet] generating {tier.fleet_domains} × {tier.fleet_trades:,} trades")
    setup = stage("setup", {"folder": str(folder / "files"), "domains": domains, "n_trades": tier.fleet_trades,
                            "seed": opts.seed + 1}, "setup.log")
    _say(progress, "[fleet] ingest")
    ingest = stage("ingest", {"db": db, "files": setup["files"]}, "ingest.log")
    _say(progress, "[fleet] learning, one process, domains one after the other")
    sequential = stage("learning", {"db": db, "domains": domains}, "learning_seq.log")
    _say(progress, "[fleet] learning, two concurrent processes")
    halves = [domains[0::2], domains[1::2]]
    t = time.perf_counter()
    procs = [start_worker("learning", {"db": db, "domains": h}, logs / f"learning_par{i}.log") for i, h in enumerate(halves)]
    results = [finish_worker(p, "learning", logs / f"learning_par{i}.log") for i, p in enumerate(procs)]
    two_way_wall = time.perf_counter() - t
    out = {
        "domains": tier.fleet_domains,
        "trades_per_domain": tier.fleet_trades,
        "ingest": {"wall_s": ingest["wall_s"], "cpu_s": ingest["cpu_s"], "peak_rss_mib": ingest["peak_rss_mib"]},
        "sequential": {"wall_s": sequential["wall_s"], "cpu_s": sequential["cpu_s"],
                       "peak_rss_mib": sequential["peak_rss_mib"], "per_domain_s": sequential["wall_s"] / len(domains)},
        "two_way": {"wall_s": two_way_wall, "peak_rss_mib": max(r["peak_rss_mib"] for r in results),
                    "process_wall_s": [r["wall_s"] for r in results]},
    }
    out["two_way_speedup"] = ratio(sequential["wall_s"], two_way_wall)
    if not opts.keep_data:
        shutil.rmtree(folder / "files", ignore_errors=True)
        _fresh_db(db)
    return out


# -- the whole benchmark ----------------------------------------------------------------


def run_bench(tier_choice: str, out_dir: str | Path, opts: BenchOptions | None = None, *,
              sizes: Sequence[int] | None = None, command: str | None = None,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the tier(s) and write report.md, report.json and scaling.png into `out_dir`; returns the result.

    `sizes` overrides the tier's trade counts (e.g. a tiny size in tests); the fleet
    runs only for tiers that define one and only when no override is given.
    """
    opts = opts or BenchOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    tiers = tiers_for(tier_choice)
    trade_counts = sorted(set(sizes)) if sizes else sorted({t.n_trades for t in tiers})
    started = time.time()
    load_before = _loadavg()
    result: dict[str, Any] = {"meta": {
        "command": command or f"meta-pipeline bench --tier {tier_choice}",
        "tiers": [t.name for t in tiers],
        "repeat": opts.repeat,
        "seed": opts.seed,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "load_before": load_before,
        "memory_method": MEMORY_METHOD,
        "options": asdict(opts),
    }, "sizes": []}
    for n in trade_counts:
        result["sizes"].append(bench_size(n, work, opts, progress))
    if opts.fleet and not sizes:
        fleet_tier = next((t for t in tiers if t.fleet_domains), None)
        if fleet_tier is not None:
            result["fleet"] = bench_fleet(fleet_tier, work, opts, progress)
    if opts.controller_day and not opts.workers_in_process:  # the stage points its process at its own store
        _say(progress, "[controller] Dagster storage per controller run; runs per simulated day at 100 domains")
        per_run = run_worker("controller_runs", {"folder": str(work / "controller")}, work / "controller.log",
                             opts.workers_in_process)
        result["controller_day"] = controller_day(per_run)
    result["exponents"] = exponents_of(result["sizes"])
    result["local_exponents"] = local_exponents(result["sizes"]) if len(result["sizes"]) > 2 else {}
    result["meta"]["elapsed_s"] = time.time() - started
    result["meta"]["load_after"] = _loadavg()
    result["targets"] = evaluate_targets(result)
    write_report(result, out)
    if not opts.keep_data:
        shutil.rmtree(work, ignore_errors=True)
    return result


def write_report(result: dict[str, Any], out: Path) -> dict[str, Path]:
    paths = {"markdown": out / "report.md", "json": out / "report.json", "plot": out / "scaling.png"}
    paths["json"].write_text(json.dumps(result, indent=2, default=_json_default))
    paths["markdown"].write_text(render_markdown(result))
    scaling_figure(result).savefig(paths["plot"], dpi=110)
    return paths


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


if __name__ == "__main__":  # the worker entry point
    if len(sys.argv) >= 4 and sys.argv[1] == "worker":
        sys.exit(worker_main(sys.argv[2:]))
    print("usage: meta-pipeline bench (this module's own entry point is for its worker processes)", file=sys.stderr)
    sys.exit(2)
