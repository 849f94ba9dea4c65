"""The report of a benchmark run: a Markdown summary and PNG charts, from the results dict.

The results dict is what the harness writes as JSON::

    {"started": "2026-11-26T15:04:05Z", "duration_seconds": 512.3, "command": "...",
     "args": {"keys": ..., "runs": ..., ...}, "machine": machine_info(...),
     "rows": [Row.to_json(), ...], "checks": [{"name", "goal", "ratio", "passed", "detail"}, ...],
     "skipped": [{"workload", "subject", "why"}, ...], "notes": ["...", ...]}

A check's goal is a ratio (speed relative to the baseline, at least ``goal``)
unless it has a ``"unit"``: then it is a bound on a figure (at most ``goal``
``unit``, the figure in ``"measured"``). A check that judges particular rows,
not a whole workload, lists them in ``"rows"`` as ``[workload, case, subject]``.
A check's ``"spread"`` (:func:`benchmarks.harness.spread`) is how the
per-round ratios of its worst case spread (of its samples, for a bound): ``n``,
``min``, ``q1``, ``median``, ``q3``, ``max`` and ``ci95``, the 95% confidence
interval of the median. A row paired with its baseline has ``"rounds"``,
``"ratios"`` (per round) and their ``"ratio_spread"``. ``"load"`` is, per
workload, the 1-minute load average at its start and end and the share of the
machine's CPU time that was busy meanwhile (``"busy"``).

:func:`write` stores it as ``<stem>.json`` next to ``<stem>.md`` (:func:`markdown`)
and the charts (:func:`charts`): one ``<stem>-<workload>.png`` per workload (by
process count for a workload measured at several) and ``<stem>-summary.png``,
kvlog's ratio to its baseline in every case, against its goal where it has one.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display needed

import matplotlib.patches
import matplotlib.pyplot as plt
from matplotlib import ticker
from matplotlib.transforms import blended_transform_factory

__all__ = ["charts", "markdown", "write"]

TIMES = "\u00d7"  # the multiplication sign of ratios (ruff flags the literal character)
DASH = "\u2013"  # the en dash of ranges

#: Goals of kvlog's ratio to its baseline, per workload, when the checks do not name them.
DEFAULT_GOALS = {"point reads": 0.7, "cold replay": 0.8}
#: Package versions shown in the machine summary, in this order (others follow).
KEY_PACKAGES = ("kvlog", "lmdb", "msgpack", "kafka-python")

KVLOG_COLOR = "#1f5fbf"
KVLOG_SHADES = ("#1f5fbf", "#3d85e0", "#0b3d82", "#6aa5ee")
MUTED = (
    "#9aa5b1",
    "#c4b59a",
    "#a8bfa3",
    "#c9a3a8",
    "#b3a9cc",
    "#a3c4c9",
    "#cdbf8f",
    "#b8b8b8",
    "#d4b3c9",
    "#9fb7a0",
    "#c2a98d",
    "#a9b4d0",
)
BELOW_GOAL_COLOR = "#d1495b"
DPI = 120
WIDTH_INCHES = 1600 / DPI
LOG_SPAN = 30.0


# -- rows ------------------------------------------------------------------------------


def is_kvlog(subject: str) -> bool:
    """Whether a subject is kvlog itself (``kvlog``, ``kvlog ...`` or an fsync policy of it)."""
    s = subject.lower()
    return s.startswith("kvlog") or s.startswith("fsync=")


def _rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows with median/min/max present (computed from the samples when missing)."""
    rows = []
    for raw in results.get("rows") or []:
        row = dict(raw)
        samples = [float(x) for x in row.get("samples") or []]
        if samples:
            row.setdefault("median", statistics.median(samples))
            row.setdefault("min", min(samples))
            row.setdefault("max", max(samples))
        if row.get("median") is None:
            continue
        row.setdefault("min", row["median"])
        row.setdefault("max", row["median"])
        row.setdefault("higher_is_better", True)
        row.setdefault("baseline", None)
        row.setdefault("ratio", None)
        row.setdefault("note", "")
        row.setdefault("unit", "")
        rows.append(row)
    return rows


def _grouped(rows: Iterable[dict[str, Any]], key: str) -> dict[str, list[dict[str, Any]]]:
    """Rows by ``row[key]``, in order of first appearance."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row[key]), []).append(row)
    return groups


def slug(text: str) -> str:
    """A filesystem-safe, lowercase name: ``"point reads"`` -> ``"point-reads"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "workload"


def stem_of(results: Mapping[str, Any]) -> str:
    """The file stem of a run: its start time, filesystem-safe (``2026-11-26T15-04-05Z``)."""
    started = str(results.get("started") or "")
    return re.sub(r"[^0-9A-Za-z_.-]+", "-", started).strip("-.") or "results"


def goals(results: Mapping[str, Any]) -> dict[str, float]:
    """Goal ratio per workload: the checks' (``"<workload> vs ..."``), else :data:`DEFAULT_GOALS`."""
    found = dict(DEFAULT_GOALS)
    workloads = {str(r.get("workload")) for r in results.get("rows") or []}
    for check in results.get("checks") or []:
        name, goal = str(check.get("name", "")), check.get("goal")
        if goal is None or check.get("unit") or check.get("rows"):
            continue  # an absolute goal, or one of some rows only (see row_goals)
        for workload in workloads:
            if name == workload or name.startswith(f"{workload} vs") or name.startswith(f"{workload}:"):
                found[workload] = float(goal)
    return found


def row_goals(results: Mapping[str, Any]) -> dict[tuple[str, str, str], float]:
    """Goal ratio per ``(workload, case, subject)`` of the checks that name their rows (``"rows"``).

    A workload whose goals differ from row to row (the processes workload's)
    names the rows each goal judges; absolute goals (with a ``"unit"``) are no ratios and are left out.
    """
    found: dict[tuple[str, str, str], float] = {}
    for check in results.get("checks") or []:
        if check.get("goal") is None or check.get("unit"):
            continue
        for judged in check.get("rows") or []:
            workload, case, subject = (str(part) for part in judged)
            found[(workload, case, subject)] = float(check["goal"])
    return found


def spread_cell(check: Mapping[str, Any]) -> str:
    """How the check's figure spread over its samples: the per-round ratios' IQR, min-max, n and the CI of the median."""
    spread = check.get("spread")
    if not spread:
        return "—" if check.get("ratio") is None and check.get("measured") is None else "unpaired"
    unit = f" {check['unit']}" if check.get("unit") else TIMES
    low, high = spread["ci95"]
    return (
        f"IQR {_num(spread['q1'])}{DASH}{_num(spread['q3'])}{unit}, "
        f"min{DASH}max {_num(spread['min'])}{DASH}{_num(spread['max'])}{unit} (n={spread['n']}); "
        f"median's 95% CI {_num(low)}{DASH}{_num(high)}{unit}"
    )


def _num(value: float) -> str:
    """A ratio or a small figure with the digits a spread needs: 0.781, 1.052, 12.3, 250."""
    if abs(value) >= 100:
        return fmt(value)
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"


def check_cells(check: Mapping[str, Any]) -> tuple[str, str]:
    """The goal and the measured figure of a check, as shown: ratios, or a figure and its unit."""
    goal, unit = check.get("goal"), check.get("unit")
    if unit:
        measured = check.get("measured")
        return (
            f"≤ {fmt(goal)} {unit}" if goal is not None else "",
            f"{fmt(measured)} {unit}" if measured is not None else "—",
        )
    ratio = check.get("ratio")
    measured = fmt_ratio(ratio)
    if ratio is not None and goal is not None and measured == fmt_ratio(goal) and ratio < goal:
        measured = f"{ratio:.3f}{TIMES}"  # just below the goal: do not print it as the goal
    return (f"≥ {fmt_ratio(goal)}" if goal is not None else "", measured)


# -- numbers ---------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    """Thousands separators for large values, three significant digits for small ones."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude == 0:
        return "0"
    digits = max(0, 2 - math.floor(math.log10(magnitude)))
    return f"{value:.{digits}f}"


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "—"
    if ratio >= 10:
        return f"{ratio:,.0f}{TIMES}"
    if ratio >= 0.095:
        return f"{ratio:.2f}{TIMES}"
    return f"{ratio:.2g}{TIMES}"


def _bytes_gb(value: Any) -> str | None:
    try:
        return f"{float(value) / 1e9:.1f} GB RAM"
    except (TypeError, ValueError):
        return None


def _when(started: str) -> str:
    try:
        moment = datetime.fromisoformat(started.replace("Z", "+00:00"))
    except ValueError:
        return started
    offset = moment.utcoffset()
    zone = "UTC" if offset is not None and offset.total_seconds() == 0 else ""
    return f"{moment:%Y-%m-%d %H:%M} {zone}".strip()


def _duration(seconds: Any) -> str | None:
    try:
        total = round(float(seconds))
    except (TypeError, ValueError):
        return None
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def machine_summary(machine: Mapping[str, Any]) -> str:
    """One line: cores, memory, CPU, OS, Python, Kafka broker, key package versions."""
    parts = []
    if machine.get("cores"):
        parts.append(f"{machine['cores']} cores")
    memory = _bytes_gb(machine.get("memory_bytes"))
    if memory:
        parts.append(memory)
    for name in ("cpu", "os", "python"):
        if machine.get(name):
            parts.append(str(machine[name]))
    if machine.get("kafka_broker"):
        parts.append(f"Kafka {machine['kafka_broker']}")
    packages = {k: v for k, v in (machine.get("packages") or {}).items() if v}
    ordered = [k for k in KEY_PACKAGES if k in packages] + [k for k in packages if k not in KEY_PACKAGES]
    if ordered:
        parts.append(", ".join(f"{k} {packages[k]}" for k in ordered))
    return " · ".join(parts)


# -- markdown --------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _vs_baseline(row: Mapping[str, Any], baselines: set[str]) -> str:
    if row["baseline"] is None:
        return "*baseline*" if row["subject"] in baselines else ""
    if row["ratio"] is None:
        return f"— ({row['baseline']}: not measured)"
    text = f"{fmt_ratio(row['ratio'])} {row['baseline']}"
    spread = row.get("ratio_spread")
    if spread:
        text += f" (IQR {_num(spread['q1'])}{DASH}{_num(spread['q3'])})"
    return text


def _load_line(load: Mapping[str, Any]) -> str:
    """How busy the machine was during each workload, from the results' ``"load"``."""
    parts = []
    for workload, figures in load.items():
        busy = figures.get("busy")
        averages = [a for a in figures.get("loadavg") or [] if a is not None]
        text = f"{workload} {busy:.0%} busy" if busy is not None else workload
        if averages:
            text += f" (load {DASH.join(f'{a:.1f}' for a in averages)})"
        parts.append(text)
    return "Machine load (share of all cores' time busy, by anything): " + ", ".join(parts) if parts else ""


def _row_notes(rows: list[dict[str, Any]]) -> list[str]:
    """The rows' notes as bullets, each once, saying which cases or subjects it is about."""
    about: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("note"):
            about.setdefault(str(row["note"]), []).append(row)
    if not about:
        return []
    cases = _grouped(rows, "case")
    lines = [""]
    for note, noted in about.items():
        ids = {id(r) for r in noted}
        whole = [c for c, case_rows in cases.items() if all(id(r) in ids for r in case_rows)]
        if len(noted) == len(rows):
            who = ""
        elif sum(len(cases[c]) for c in whole) == len(noted):
            who = ", ".join(whole)
        else:
            who = ", ".join(dict.fromkeys(r["subject"] for r in noted))
        lines.append(f"- {_cell(f'{who}: {note}' if who else note)}")
    return lines


def markdown(results: Mapping[str, Any], images: Mapping[str, str] | None = None) -> str:
    """The report as Markdown: header, one table per workload, checks, skipped subjects, notes.

    ``images`` maps a workload (or ``"summary"``) to a chart's path relative to
    the Markdown file; each is linked under its table.
    """
    images = images or {}
    args = results.get("args") or {}
    lines = ["# kvlog benchmarks", ""]
    header = []
    if results.get("command"):
        header.append(f"`{results['command']}`")
    if results.get("started"):
        header.append(_when(str(results["started"])))
    duration = _duration(results.get("duration_seconds"))
    if duration:
        header.append(f"took {duration}")
    if args.get("keys") is not None:
        runs = f", {args['runs']} runs per figure" if args.get("runs") is not None else ""
        header.append(f"{int(args['keys']):,} keys{runs}")
    if args.get("nice"):
        header.append(f"niceness {args['nice']}")
    if header:
        lines += [" · ".join(header), ""]
    machine = machine_summary(results.get("machine") or {})
    if machine:
        lines += [f"Machine: {machine}", ""]
    lines += [
        "Medians of the samples, with their range. *vs baseline* is speed relative to the subject named, "
        f"measured in the same case of the same run: above 1{TIMES} is faster, whatever the unit; where "
        "the subjects took turns round by round it is the median of the per-round ratios, with their "
        "interquartile range in brackets.",
        "",
    ]
    load = _load_line(results.get("load") or {})
    if load:
        lines += [load, ""]
    source = (results.get("machine") or {}).get("kvlog_source") or {}
    if source.get("sha256"):
        state = ""
        if source.get("commit"):
            state = f" (commit {source['commit']}{', modified' if source.get('modified') else ''})"
        lines += [f"kvlog source measured: sha256 {source['sha256']}{state}.", ""]
    if "summary" in images:
        lines += [f"![kvlog relative to its baselines]({images['summary']})", ""]

    for workload, rows in _grouped(_rows(results), "workload").items():
        lines += [f"## {workload}", ""]
        lines += [
            f"| case | subject | median | min {DASH} max | unit | vs baseline |",
            "|---|---|--:|--:|---|---|",
        ]
        for case, case_rows in _grouped(rows, "case").items():
            baselines = {r["baseline"] for r in case_rows if r["baseline"]}
            for n, row in enumerate(case_rows):
                bold = is_kvlog(row["subject"])
                cells = [
                    _cell(case) if n == 0 else "",
                    _cell(row["subject"]),
                    fmt(row["median"]),
                    f"{fmt(row['min'])} {DASH} {fmt(row['max'])}",
                    _cell(row["unit"]),
                    _cell(_vs_baseline(row, baselines)),
                ]
                if bold:
                    cells[1:3] = [f"**{c}**" for c in cells[1:3]]
                    cells[5] = f"**{cells[5]}**" if cells[5] else ""
                lines.append("| " + " | ".join(cells) + " |")
        lines += _row_notes(rows)
        if workload in images:
            lines += ["", f"![{workload}]({images[workload]})"]
        lines.append("")

    from benchmarks.scale import report_lines

    lines += report_lines(results)
    checks = results.get("checks") or []
    if checks:
        lines += [
            "## Checks",
            "",
            "A ratio is the median of the per-round ratios of the worst case; *spread* is how those "
            "ratios spread (for a bound in a unit: the samples) and the 95% confidence interval of "
            "their median.",
            "",
            "| | check | goal | measured | spread | detail |",
            "|---|---|--:|--:|---|---|",
        ]
        for check in checks:
            mark = "✅" if check.get("passed") else "❌"
            goal_cell, measured_cell = check_cells(check)
            cells = [
                mark,
                _cell(str(check.get("name", ""))),
                goal_cell,
                measured_cell,
                _cell(spread_cell(check)),
                _cell(str(check.get("detail") or "")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    skipped = results.get("skipped") or []
    if skipped:
        lines += ["## Skipped", ""]
        for item in skipped:
            lines.append(
                f"- **{item.get('subject', '?')}** ({item.get('workload', '?')}): {item.get('why', '')}"
            )
        lines.append("")
    notes_list = results.get("notes") or []
    if notes_list:
        lines += ["## Notes", ""]
        lines += [f"- {note}" for note in notes_list]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def compact(results: Mapping[str, Any]) -> str:
    """One small table per workload, cases as rows and subjects as columns (for the README).

    A cell is the median, with its ratio to the case's baseline in brackets;
    kvlog's cells are bold and the baseline's is marked *(base)*.
    """
    lines: list[str] = []
    for workload, rows in _grouped(_rows(results), "workload").items():
        subjects = list(_grouped(rows, "subject"))
        units = sorted({str(r["unit"]) for r in rows})
        lines += [f"**{workload}** ({', '.join(units)})", ""]
        lines.append("| case | " + " | ".join(_cell(s) for s in subjects) + " |")
        lines.append("|---|" + "--:|" * len(subjects))
        for case, case_rows in _grouped(rows, "case").items():
            by_subject = {r["subject"]: r for r in case_rows}
            baselines = {r["baseline"] for r in case_rows if r["baseline"]}
            cells = [_cell(case)]
            for subject in subjects:
                row = by_subject.get(subject)
                if row is None:
                    cells.append("")
                    continue
                text = fmt(row["median"])
                if row["subject"] in baselines:
                    text += " *(base)*"
                elif row.get("ratio") is not None:
                    text += f" ({fmt_ratio(row['ratio'])})"
                cells.append(f"**{text}**" if is_kvlog(subject) else text)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    checks = results.get("checks") or []
    for check in checks:
        mark = "✅" if check.get("passed") else "❌"
        goal_cell, measured_cell = check_cells(check)
        spread = check.get("spread")
        if spread:
            measured_cell += f" (IQR {_num(spread['q1'])}{DASH}{_num(spread['q3'])}, n={spread['n']})"
        lines.append(
            f"- {mark} {check.get('name')}: {measured_cell} (goal {goal_cell}; {check.get('detail')})"
        )
    skipped = results.get("skipped") or []
    for item in skipped:
        lines.append(f"- not measured: {item.get('subject')} ({item.get('workload')}): {item.get('why')}")
    return "\n".join(lines).rstrip() + "\n"


README_START = "<!-- benchmarks:start (written by python -m benchmarks --readme) -->"
README_END = "<!-- benchmarks:end -->"


def update_readme(readme: Path, results: Mapping[str, Any], paths: Mapping[str, Path]) -> None:
    """Replace the README's benchmark block (between the markers) with this run's.

    The block holds the command, the machine, the summary chart (and the
    charts by process count, if the run has one) and the compact tables, and
    links the full report; chart and report paths are written relative to the README.
    """
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} has no benchmark block ({README_START} ... {README_END})")

    def rel(path: Path) -> str:
        return Path(os.path.relpath(path.resolve(), readme.resolve().parent)).as_posix()

    args = results.get("args") or {}
    # The charts by process count (the processes workload's mixed load) go under the summary.
    scaling_images = []
    for workload, rows in _grouped(_rows(results), "workload").items():
        if workload in paths and by_process_count(rows):
            scaling_images += [f"![{workload} by process count]({rel(paths[workload])})", ""]
    block = [
        README_START,
        "",
        f"`{results.get('command')}` on {_when(str(results.get('started')))}, "
        f"{int(args.get('keys', 0)):,} keys, median of {args.get('runs')} runs "
        f"(took {_duration(results.get('duration_seconds'))}). "
        f"Machine: {machine_summary(results.get('machine') or {})}.",
        "",
        f"![kvlog relative to its baselines]({rel(paths['summary'])})",
        "",
        *scaling_images,
        "Each cell is the median; in brackets, the speed relative to the row's *(base)* subject "
        f"measured in the same run (above 1{TIMES} is faster, whatever the unit). "
        f"Full report with ranges, notes and one chart per workload: [{paths['markdown'].name}]"
        f"({rel(paths['markdown'])}).",
        "",
        compact(results).rstrip(),
        "",
        README_END,
    ]
    start = text.index(README_START)
    end = text.index(README_END) + len(README_END)
    readme.write_text(text[:start] + "\n".join(block) + text[end:])


# -- charts ----------------------------------------------------------------------------


def _style() -> Any:
    return {
        "font.size": 11,
        "axes.titlesize": 15,
        "axes.titleweight": "bold",
        "axes.labelsize": 11,
        "xtick.labelsize": 10,
        "ytick.labelsize": 10.5,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.edgecolor": "#555555",
        "axes.grid": True,
        "axes.grid.axis": "x",
        "grid.color": "#e3e3e3",
        "grid.linewidth": 0.8,
        "axes.axisbelow": True,
        "figure.facecolor": "white",
    }


def _colors(rows: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Per workload, a colour per subject: kvlog in strong blues, the rest muted.

    A subject keeps its colour from chart to chart unless that would repeat a
    colour within a chart.
    """
    chosen: dict[str, str] = {}
    result: dict[str, dict[str, str]] = {}
    for workload, workload_rows in _grouped(rows, "workload").items():
        colors: dict[str, str] = {}
        for subject in dict.fromkeys(r["subject"] for r in workload_rows):
            palette = KVLOG_SHADES if is_kvlog(subject) else MUTED
            used = set(colors.values())
            color = chosen.get(subject)
            if color is None or color in used:
                free = [c for c in palette if c not in used] or list(palette)
                fresh = [c for c in free if c not in chosen.values()]
                color = (fresh or free)[0]
                chosen.setdefault(subject, color)
            colors[subject] = color
        result[workload] = colors
    return result


def _use_log(values: list[float]) -> bool:
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) / min(positive) > LOG_SPAN


def _header_rows(ax: Any, headers: list[tuple[float, str]], separators: list[float]) -> None:
    trans = blended_transform_factory(ax.transAxes, ax.transData)
    for y, text in headers:
        ax.text(0.004, y, text, transform=trans, fontsize=11, fontweight="bold", color="#222222", va="center")
    for y in separators:
        ax.axhline(y, color="#cccccc", linewidth=0.8, zorder=1)


def _panel(ax: Any, rows: list[dict[str, Any]], colors: Mapping[str, str]) -> list[Any]:
    """Grouped horizontal bars on ``ax``: a header line per case, a bar per subject.

    Returns the value labels (for :func:`_fit_labels`).
    """
    unit = rows[0]["unit"]
    higher = rows[0]["higher_is_better"]
    values = [v for r in rows for v in (r["median"], r["min"], r["max"])]
    log = _use_log(values)
    positive = [v for v in values if v > 0] or [1.0]
    low, high = min(positive), max(positive)
    base = 10 ** math.floor(math.log10(low) - 0.15) if log else 0.0
    y = 0.0
    ticks, labels, weights, texts = [], [], [], []
    headers: list[tuple[float, str]] = []
    separators: list[float] = []
    for n, (case, case_rows) in enumerate(_grouped(rows, "case").items()):
        if n:
            separators.append(y - 0.1)
            y += 0.35
        headers.append((y, case))
        y += 0.85
        for row in case_rows:
            median, lo, hi = row["median"], row["min"], row["max"]
            kv = is_kvlog(row["subject"])
            ax.barh(
                y,
                max(median - base, 0.0) if median > 0 else 0.0,
                left=base,
                height=0.72,
                color=colors.get(row["subject"], MUTED[0]),
                edgecolor="#1b1b1b" if kv else "none",
                linewidth=0.6 if kv else 0,
                zorder=2,
            )
            if hi > lo and median > 0:
                ax.errorbar(
                    median,
                    y,
                    xerr=[[max(median - lo, 0)], [max(hi - median, 0)]],
                    fmt="none",
                    ecolor="#333333",
                    elinewidth=1.1,
                    capsize=3,
                    zorder=3,
                )
            label = fmt(median)
            if kv and row["ratio"] is not None:
                label += f"   {fmt_ratio(row['ratio'])} {row['baseline']}"
            elif kv and row["baseline"]:
                label += f"   ({row['baseline']} not measured)"
            end = max(hi, median, base)
            texts.append(
                ax.text(
                    end * 1.1 if log else end + high * 0.012,
                    y,
                    label,
                    va="center",
                    ha="left",
                    fontsize=9.5,
                    fontweight="bold" if kv else "normal",
                    color="#111111" if kv else "#444444",
                    zorder=4,
                )
            )
            ticks.append(y)
            labels.append(row["subject"])
            weights.append("bold" if kv else "normal")
            y += 1.0
    ax.set_yticks(ticks, labels)
    for tick, weight in zip(ax.get_yticklabels(), weights, strict=True):
        tick.set_fontweight(weight)
    ax.tick_params(axis="y", length=0)
    ax.set_ylim(y - 0.4, -0.6)
    _header_rows(ax, headers, separators)
    if log:
        ax.set_xscale("log")
        ax.set_xlim(base, high * 1.5)
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    else:
        ax.set_xlim(0, high * 1.1)
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(_tick))
    better = "higher is better" if higher else "lower is better"
    scale = ", log scale" if log else ""
    ax.set_xlabel(f"{unit}  ({better}{scale}; bar: median, whiskers: min {DASH} max)")
    return texts


def _fit_labels(fig: Any, labelled: list[tuple[Any, list[Any]]]) -> None:
    """Make room on the right of the figure for value labels that run past their axes.

    The axes keep their data range (no empty decades on a log axis just for a
    label); the constrained layout's area is narrowed instead, until every
    label ends inside the figure.
    """
    engine = fig.get_layout_engine()
    margin = 0.0
    for _ in range(6):
        fig.canvas.draw()
        limit = fig.bbox.width - 10
        worst, share = 0.0, 1.0
        for ax, texts in labelled:
            box = ax.get_window_extent()
            for text in texts:
                extent = text.get_window_extent()
                if extent.x1 - limit > worst:
                    worst = extent.x1 - limit
                    # A label moves left by this share of what the axes lose in width.
                    share = max(0.2, (extent.x0 - box.x0) / box.width)
        if worst <= 0.5:
            return
        margin = min(0.5, margin + worst / share / fig.bbox.width)
        engine.set(rect=(0.0, 0.0, 1.0 - margin, 1.0))


def _place_inside(fig: Any, ax: Any, candidates: list[tuple[Any, float, float]]) -> list[Any]:
    """Keep each label inside its bar where it fits; move the others after the bar.

    ``candidates`` are ``(text, bar start, x after the bar)``. Returns the moved labels.
    """
    fig.canvas.draw()
    moved = []
    for text, start, outside in candidates:
        left_px = ax.transData.transform((start, 0))[0]
        if text.get_window_extent().x0 < left_px + 6:
            text.set_x(outside)
            text.set_horizontalalignment("left")
            text.set_color("#222222")
            text.set_fontweight("normal")
            text.set_bbox({"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.0})
            moved.append(text)
    return moved


def _tick(value: float, _pos: Any = None) -> str:
    """An axis tick: whole numbers without decimals."""
    if value >= 1 and float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:g}" if abs(value) < 1 else fmt(value)


def _tick_ratio(value: float, _pos: Any = None) -> str:
    return f"{value:g}{TIMES}"


def _height(n_rows: int, n_groups: int) -> float:
    return 0.34 * n_rows + 0.45 * n_groups + 0.9


def _workload_chart(
    workload: str, rows: list[dict[str, Any]], keys: Any, colors: Mapping[str, str], path: Path
) -> Path:
    by_unit = _grouped(rows, "unit")
    heights = [_height(len(r), len(_grouped(r, "case"))) for r in by_unit.values()]
    with plt.rc_context(_style()):
        fig, axes = plt.subplots(
            len(by_unit),
            1,
            figsize=(WIDTH_INCHES, sum(heights) + 0.6),
            gridspec_kw={"height_ratios": heights},
            squeeze=False,
            layout="constrained",
        )
        labelled = [(ax, _panel(ax, r, colors)) for ax, r in zip(axes[:, 0], by_unit.values(), strict=True)]
        title = workload if keys is None else f"{workload} — {int(keys):,} keys"
        fig.suptitle(title, fontsize=15, fontweight="bold", x=0.01, ha="left")
        _fit_labels(fig, labelled)
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
    return path


PROCESS_CASE = re.compile(r"^(\d+) process(?:es)?$")


def by_process_count(rows: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """The rows of cases named ``"<n> process(es)"``, by ``n``, if there are at least two such counts.

    Only rows of the unit of the first such row are kept (a chart has one axis).
    """
    matched = [(PROCESS_CASE.match(str(r["case"])), r) for r in rows]
    found = [(int(m.group(1)), r) for m, r in matched if m]
    if not found:
        return {}
    unit = found[0][1]["unit"]
    counts: dict[int, list[dict[str, Any]]] = {}
    for n, row in sorted(found, key=lambda item: item[0]):
        if row["unit"] == unit:
            counts.setdefault(n, []).append(row)
    return counts if len(counts) >= 2 else {}


def _scaling_chart(
    workload: str,
    counts: Mapping[int, list[dict[str, Any]]],
    keys: Any,
    colors: Mapping[str, str],
    path: Path,
) -> Path:
    """Grouped vertical bars: one group per process count, one bar per subject (median, min-max whiskers).

    kvlog's bars carry their ratio to their baseline under the figure; the
    legend names each kvlog subject's baseline.
    """
    rows = [r for group in counts.values() for r in group]
    subjects = list(dict.fromkeys(r["subject"] for r in rows))
    unit, higher = rows[0]["unit"], rows[0]["higher_is_better"]
    values = [v for r in rows for v in (r["median"], r["min"], r["max"])]
    log = _use_log(values)
    width = 0.82 / max(len(subjects), 1)
    with plt.rc_context({**_style(), "axes.grid.axis": "y"}):
        fig, ax = plt.subplots(figsize=(WIDTH_INCHES, 6.2), layout="constrained")
        for g, group in enumerate(counts.values()):
            by_subject = {r["subject"]: r for r in group}
            for k, subject in enumerate(subjects):
                row = by_subject.get(subject)
                if row is None:
                    continue
                x = g + (k - (len(subjects) - 1) / 2) * width
                median, lo, hi = row["median"], row["min"], row["max"]
                kv = is_kvlog(subject)
                ax.bar(
                    x,
                    median,
                    width=width * 0.92,
                    color=colors.get(subject, MUTED[0]),
                    edgecolor="#1b1b1b" if kv else "none",
                    linewidth=0.6 if kv else 0,
                    zorder=2,
                )
                if hi > lo:
                    ax.errorbar(
                        x,
                        median,
                        yerr=[[max(median - lo, 0)], [max(hi - median, 0)]],
                        fmt="none",
                        ecolor="#333333",
                        elinewidth=1.1,
                        capsize=3,
                        zorder=3,
                    )
                label = fmt(median)
                if kv and row["ratio"] is not None:
                    label += f"\n{fmt_ratio(row['ratio'])}"
                ax.annotate(
                    label,
                    (x, max(hi, median)),
                    xytext=(0, 3),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=8.5,
                    fontweight="bold" if kv else "normal",
                    color="#111111" if kv else "#444444",
                    zorder=4,
                )
        ax.set_xticks(range(len(counts)), [f"{n} process" + ("es" if n != 1 else "") for n in counts])
        ax.tick_params(axis="x", length=0, labelsize=11)
        if log:
            ax.set_yscale("log")
            positive = [v for v in values if v > 0] or [1.0]
            ax.set_ylim(10 ** math.floor(math.log10(min(positive))), max(positive) * 4)
        else:
            ax.set_ylim(0, max([*values, 1.0]) * 1.18)
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(_tick))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        better = "higher is better" if higher else "lower is better"
        ax.set_ylabel(f"{unit}  ({better}{', log scale' if log else ''})")
        ax.set_xlabel(
            f"bar: median, whiskers: min {DASH} max; under kvlog's figure its speed relative to its baseline"
        )
        handles = []
        for subject in subjects:
            baseline = next((r["baseline"] for r in rows if r["subject"] == subject and r["baseline"]), None)
            name = f"{subject} ({TIMES} vs {baseline})" if baseline else subject
            kv = is_kvlog(subject)
            handles.append(
                matplotlib.patches.Patch(
                    facecolor=colors.get(subject, MUTED[0]),
                    edgecolor="#1b1b1b" if kv else "none",
                    linewidth=0.6 if kv else 0,
                    label=name,
                )
            )
        ax.legend(handles=handles, loc="upper right", fontsize=9.5, frameon=False)
        title = f"{workload} by process count" + (f" — {int(keys):,} keys" if keys is not None else "")
        fig.suptitle(title, fontsize=15, fontweight="bold", x=0.01, ha="left")
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
    return path


def _summary_label(ratio: float, goal: float | None) -> str:
    text = fmt_ratio(ratio)
    if goal is not None and ratio < goal and text == fmt_ratio(goal):
        text = f"{ratio:.3f}{TIMES}"  # just below the goal: do not print it as the goal
    return text


def _summary_chart(results: Mapping[str, Any], rows: list[dict[str, Any]], path: Path) -> Path:
    goal_of = goals(results)
    goal_of_row = row_goals(results)
    entries = [r for r in rows if is_kvlog(r["subject"]) and r["baseline"]]
    by_workload = _grouped(entries, "workload")
    with plt.rc_context(_style()):
        fig, ax = plt.subplots(
            figsize=(WIDTH_INCHES, _height(max(len(entries), 1), len(by_workload)) + 0.6),
            layout="constrained",
        )
        ratios = [r["ratio"] for r in entries if r["ratio"]]
        ratios += [1.0] + [goal_of[w] for w in by_workload if w in goal_of]
        ratios += [
            goal_of_row[k]
            for k in ((r["workload"], r["case"], r["subject"]) for r in entries)
            if k in goal_of_row
        ]
        log = _use_log(ratios)
        low, high = min(ratios), max(ratios)
        base = 10 ** math.floor(math.log10(low) - 0.15) if log else 0.0
        y = 0.0
        ticks, labels, texts = [], [], []
        candidates: list[tuple[Any, float, float]] = []
        headers: list[tuple[float, str]] = []
        separators: list[float] = []
        below = False
        for n, (workload, workload_rows) in enumerate(by_workload.items()):
            if n:
                separators.append(y - 0.1)
                y += 0.35
            headers.append((y, workload))
            y += 0.85
            top = y - 0.5
            goal = goal_of.get(workload)
            for row in workload_rows:
                ratio = row["ratio"]
                name = row["case"] if row["subject"] == "kvlog" else f"{row['case']} · {row['subject']}"
                own = goal_of_row.get((row["workload"], row["case"], row["subject"]))
                if own is not None:
                    # This row's own goal: a tick behind its bar, sticking out above and below it.
                    ax.plot(
                        [own, own],
                        [y - 0.5, y + 0.5],
                        color=BELOW_GOAL_COLOR,
                        linestyle="--",
                        linewidth=2,
                        zorder=1.5,
                    )
                row_goal = own if own is not None else goal
                if ratio:
                    missed = row_goal is not None and ratio < row_goal
                    below = below or missed
                    color = BELOW_GOAL_COLOR if missed else KVLOG_COLOR
                    ax.barh(y, ratio - base, left=base, height=0.72, color=color, zorder=2)
                    text = f"{_summary_label(ratio, row_goal)} {row['baseline']}"
                    if own is not None:
                        text += f" (goal {fmt_ratio(own)})"
                    # Inside the bar's end when it fits (see _place_inside), else after it.
                    inside = ratio / 1.04 if log else ratio - high * 0.01
                    label = ax.text(
                        inside, y, text, va="center", ha="right", fontsize=9.5, color="white", zorder=6
                    )
                    label.set_fontweight("bold")
                    outside = ratio * 1.04 if log else ratio + high * 0.01
                    candidates.append((label, base, outside))
                else:
                    text = f"not measured (no {row['baseline']})"
                    x = base * 1.06 if log else high * 0.012
                    texts.append(ax.text(x, y, text, va="center", ha="left", fontsize=9.5, color="#222222"))
                ticks.append(y)
                labels.append(name)
                y += 1.0
            if goal is not None:
                # Behind the bars: seen between them and past the ones that fall short of it.
                ax.plot(
                    [goal, goal],
                    [top, y - 0.5],
                    color=BELOW_GOAL_COLOR,
                    linestyle="--",
                    linewidth=2,
                    zorder=1.5,
                )
                ax.text(
                    goal,
                    top - 0.35,
                    f" goal {fmt_ratio(goal)}",
                    color="#b3263a",
                    zorder=6,
                    fontsize=9.5,
                    fontweight="bold",
                    va="center",
                    ha="left",
                )
        ax.axvline(1.0, color="#222222", linewidth=1.5, zorder=1.5)
        ax.set_yticks(ticks, labels)
        ax.tick_params(axis="y", length=0)
        ax.set_ylim(y - 0.4, -0.6)
        _header_rows(ax, headers, separators)
        if log:
            ax.set_xscale("log")
            ax.set_xlim(base, max(high, 1.0) * 1.5)
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        else:
            ax.set_xlim(0, max(high, 1.0) * 1.1)
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(_tick_ratio))
        ax.set_xlabel(
            f"kvlog's speed relative to its baseline (1{TIMES} = as fast; above = faster"
            + (", log scale)" if log else ")")
            + ("; red: below the goal" if below else "")
        )
        keys = (results.get("args") or {}).get("keys")
        title = "kvlog relative to its baselines" + (f" — {int(keys):,} keys" if keys is not None else "")
        fig.suptitle(title, fontsize=15, fontweight="bold", x=0.01, ha="left")
        if not entries:
            ax.text(0.5, 0.5, "no kvlog row with a baseline", transform=ax.transAxes, ha="center")
        texts += _place_inside(fig, ax, candidates)
        _fit_labels(fig, [(ax, texts)])
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
    return path


def charts(results: Mapping[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """One PNG per workload (``<stem>-<workload>.png``) and ``<stem>-summary.png``.

    A subject has the same colour in every chart: kvlog in strong blues, the
    rest muted. A workload measured at several process counts (cases named
    ``"1 process"``, ``"2 processes"``, ...) gets a chart by process count
    (:func:`by_process_count`) instead of one bar group per case.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = _rows(results)
    keys = (results.get("args") or {}).get("keys")
    colors = _colors(rows)
    paths = []
    for workload, workload_rows in _grouped(rows, "workload").items():
        path = out_dir / f"{stem}-{slug(workload)}.png"
        scaling = by_process_count(workload_rows)
        if scaling:
            paths.append(_scaling_chart(workload, scaling, keys, colors[workload], path))
        else:
            paths.append(_workload_chart(workload, workload_rows, keys, colors[workload], path))
    paths.append(_summary_chart(results, rows, out_dir / f"{stem}-summary.png"))
    return paths


def write(results: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and the charts; return their paths.

    Keys: ``"json"``, ``"markdown"``, ``"summary"`` and each workload's name.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem_of(results)
    paths: dict[str, Path] = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n")
    chart_paths = charts(results, out_dir, stem)
    workloads = list(_grouped(_rows(results), "workload"))
    for workload, path in zip([*workloads, "summary"], chart_paths, strict=True):
        paths[workload] = path
    images = {name: path.name for name, path in paths.items() if path.suffix == ".png"}
    paths["markdown"].write_text(markdown(results, images=images))
    return paths
