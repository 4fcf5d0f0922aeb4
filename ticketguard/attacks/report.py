"""The benchmark's reports: CSV and JSON of every cell, plots, Markdown and HTML, a terminal table."""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ticketguard.files import atomic_path, write_json_atomic, write_text_atomic
from ticketguard.verify.stats import format_p

CSV_NAME, JSON_NAME, PLOT_NAME = "results.csv", "results.json", "plots.png"
MD_NAME, HTML_NAME = "report.md", "report.html"


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value)  # "-inf" stored as text
    except (TypeError, ValueError):
        return None


def _params_text(record: dict[str, Any]) -> str:
    grid = record.get("grid") or {}
    return ", ".join(f"{k}={v}" for k, v in grid.items()) or "defaults"


def _percent(value: Any) -> str:
    v = _num(value)
    return "-" if v is None else f"{100 * v:.2f}%"


def _points(value: Any) -> str:
    v = _num(value)
    return "-" if v is None else f"{100 * v:+.2f}"


def _smallest(record: dict[str, Any]) -> tuple[str, float | None]:
    values = [
        (e["name"], _num(e.get("log10_p")))
        for e in record.get("evidence") or []
        if _num(e.get("log10_p")) is not None
    ]
    if not values:
        return "-", None
    name, value = min(values, key=lambda item: item[1])  # type: ignore[arg-type, return-value]
    return name, value


def evidence_text(record: dict[str, Any]) -> str:
    """Return the cell's strongest evidence as text (the smallest p, a valid signature)."""
    if record.get("attack") == "key-search":
        d = record.get("details") or {}
        return f"{d.get('verified')} of {d.get('tries')} random keys verified"
    name, value = _smallest(record)
    parts = [] if value is None else [f"{name} p = {format_p(value)}"]
    if record.get("crypto_valid"):
        parts.append("signature valid")
    return "; ".join(parts) or "-"


def verdict_text(record: dict[str, Any]) -> str:
    """Return what the cell's judge decided, in words."""
    if record.get("error"):
        return f"error: {record['error']}"
    if record.get("winner") is not None:
        return f"dispute won by the {record['winner']}"
    if record.get("verified") is None:
        return "-"
    return "verified" if record["verified"] else "NOT verified"


def _evidence_cell(record: dict[str, Any], name: str) -> str:
    for e in record.get("evidence") or []:
        if e["name"] != name:
            continue
        value = _num(e.get("log10_p"))
        if value is not None:
            return f"p = {format_p(value)}"
        if e.get("valid") is not None:
            return "valid" if e["valid"] else "invalid"
        return "not judged"
    return "-"


def summary_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Return one display row per cell: attack, parameters, accuracy, each evidence's p-value
    (or signature check), the verdict and whether the attack succeeded."""
    names = [n for n in _evidence_names(records) if n != "W1 topology"]
    rows = []
    for r in records:
        row = {
            "attack": str(r.get("label") or r.get("attack")),
            "parameters": _params_text(r),
            "seed": str(r.get("seed")),
            "accuracy": _percent(r.get("accuracy_after")),
            "drop (pts)": _points(r.get("drop")),
        }
        for name in names:
            row[name] = _evidence_cell(r, name)
        if r.get("attack") == "key-search":
            row[names[0] if names else "evidence"] = evidence_text(r)
        row["verdict"] = verdict_text(r)
        row["attack succeeded"] = (
            "-" if r.get("error") else ("YES" if r.get("attack_succeeded") else "no")
        )
        rows.append(row)
    return rows


def _evidence_names(records: Sequence[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for r in records:
        for e in r.get("evidence") or []:
            if e["name"] not in names:
                names.append(e["name"])
    return names


def write_csv(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Write one row per cell, with a log10 p (or validity) column per evidence."""
    names = _evidence_names(records)
    columns = (
        [
            "id",
            "attack",
            "label",
            "kind",
            "seed",
            "params",
            "strength",
            "strength_value",
            "accuracy_before",
            "accuracy_after",
            "drop",
            "verified",
            "crypto_valid",
            "winner",
            "attack_succeeded",
            "seconds_attack",
            "seconds_verify",
            "error",
        ]
        + [f"{n} log10_p" for n in names]
        + [f"{n} valid" for n in names]
    )
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            row = {k: r.get(k) for k in columns}
            row["params"] = json.dumps(r.get("params"), sort_keys=True)
            for e in r.get("evidence") or []:
                row[f"{e['name']} log10_p"] = e.get("log10_p")
                row[f"{e['name']} valid"] = e.get("valid")
            writer.writerow(row)


def _plotted(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    panels: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("error") or r.get("winner") is not None or r.get("attack") == "key-search":
            continue
        panels.setdefault(str(r.get("label") or r["attack"]), []).append(r)
    return panels


def write_plots(records: Sequence[dict[str, Any]], path: Path, max_drop: float) -> bool:
    """Draw -log10 p of each evidence and the accuracy against attack strength, a panel per
    attack; return False when no cell can be plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _plotted(records)
    if not panels:
        return False
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    markers = "osD^vP*X"
    for ax, (label, cells) in zip(axes.flat, panels.items(), strict=False):
        strength = cells[0].get("strength")
        twin = ax.twinx()
        variants: dict[str, list[dict[str, Any]]] = {}
        for c in cells:
            rest = {k: v for k, v in (c.get("grid") or {}).items() if k != strength}
            variants.setdefault(", ".join(f"{k}={v}" for k, v in rest.items()), []).append(c)
        for v_index, (variant, group) in enumerate(variants.items()):
            group = sorted(group, key=lambda c: _num(c.get("strength_value")) or 0.0)
            xs = [_num(c.get("strength_value")) or 0.0 for c in group]
            for e_index, name in enumerate(_evidence_names(group)):
                ys = []
                for c in group:
                    found = [e for e in c.get("evidence") or [] if e["name"] == name]
                    value = _num(found[0].get("log10_p")) if found else None
                    ys.append(math.nan if value is None else -value)
                if all(math.isnan(y) for y in ys):
                    continue
                tag = f"{name}" + (f" ({variant})" if variant else "")
                ax.plot(xs, ys, marker=markers[(v_index + e_index) % len(markers)], label=tag)
            accs = [100 * (_num(c.get("accuracy_after")) or math.nan) for c in group]
            twin.plot(xs, accs, color="black", linestyle=":", marker="x", alpha=0.7)
        threshold = _num(cells[0].get("threshold_log10"))
        if threshold is not None:
            ax.axhline(-threshold, color="red", linestyle="--", linewidth=1, label="threshold")
        before = _num(cells[0].get("accuracy_before"))
        if before is not None:
            twin.axhline(100 * (before - max_drop), color="grey", linestyle="-.", linewidth=1)
        ax.set_yscale("symlog", linthresh=10)
        top = max(
            [-threshold if threshold is not None else 10.0]
            + [y for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y)]
        )
        ax.set_ylim(0, max(20.0, 2 * top))
        ax.set_title(label)
        ax.set_xlabel(strength or "(no strength parameter)")
        ax.set_ylabel("-log10 p")
        twin.set_ylabel("test accuracy % (x, dotted)")
        ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True


def _lost(records: Sequence[dict[str, Any]], max_drop: float) -> list[str]:
    lines = []
    for r in records:
        if r.get("error") or r.get("verified") is not False or r.get("winner") is not None:
            continue
        drop = _num(r.get("drop"))
        cost = (
            "and the accuracy stayed within bounds: the attack succeeded"
            if r.get("attack_succeeded")
            else f"but the accuracy fell by {_points(drop)} points (more than {100 * max_drop:g}): "
            "the attack fails"
        )
        lines.append(
            f"{r.get('label') or r['attack']} ({_params_text(r)}, seed {r.get('seed')}): "
            f"evidence lost ({evidence_text(r)}) {cost}"
        )
    return lines


def _ambiguity(records: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for r in records:
        if r.get("error"):
            continue
        if r.get("winner") is not None:
            lines.append(
                f"{r.get('label') or r['attack']} ({_params_text(r)}): the dispute names the "
                f"{r['winner']}: " + "; ".join(r.get("reasoning") or [])
            )
        elif r.get("attack") == "key-search":
            d = r.get("details") or {}
            best = d.get("smallest_log10_p") or {}
            shown = ", ".join(f"{k} p = {format_p(float(v))}" for k, v in best.items())
            lines.append(
                f"key search: {d.get('verified')} of {d.get('tries')} random keys verified "
                f"(bound tries x alpha = {d.get('bound')}; smallest {shown})"
            )
    return lines


def _markdown(
    rows: list[dict[str, str]], config: Any, records: Sequence[dict[str, Any]], plot: bool
) -> str:
    head = list(rows[0]) if rows else []
    lines = [
        f"# ticketguard robustness benchmark: {config.name}",
        "",
        f"- target: `{config.ticket}` (credential `{config.credential}`)",
        f"- alpha = {config.alpha:g} (Bonferroni over each verification's evidence); an attack "
        f"succeeds only if the owner's evidence is lost **and** the accuracy drop is at most "
        f"{100 * config.max_drop:g} points",
        f"- attacker's data fraction {config.data_fraction:g}; seeds {list(config.seeds)}; "
        f"reference alignment {'on' if config.reference else 'off'}; black-box queries "
        f"{'on' if config.blackbox else 'off'}",
        "",
        "## Results",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join("---" for _ in head) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(v.replace("|", "\\|") for v in row.values()) + " |")
    lost = _lost(records, config.max_drop)
    lines += ["", "## Where the evidence was lost", ""]
    lines += [f"- {line}" for line in lost] or ["- nowhere: every attacked model still verified"]
    amb = _ambiguity(records)
    if amb:
        lines += ["", "## Ambiguity attacks", ""] + [f"- {line}" for line in amb]
    if plot:
        lines += [
            "",
            "## Plots",
            "",
            f"![-log10 p and accuracy against attack strength]({PLOT_NAME})",
        ]
    return "\n".join(lines) + "\n"


def _html(
    rows: list[dict[str, str]], config: Any, records: Sequence[dict[str, Any]], plot: Path | None
) -> str:
    e = html.escape
    head = list(rows[0]) if rows else []
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>ticketguard benchmark: {e(config.name)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}"
        ".yes{color:#b00;font-weight:bold}</style></head><body>",
        f"<h1>ticketguard robustness benchmark: {e(config.name)}</h1>",
        f"<p>Target <code>{e(str(config.ticket))}</code>; alpha = {config.alpha:g}; an attack "
        f"succeeds only if the owner's evidence is lost and the accuracy drop is at most "
        f"{100 * config.max_drop:g} points.</p>",
        "<h2>Results</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>",
    ]
    for row in rows:
        cls = " class='yes'" if row.get("attack succeeded") == "YES" else ""
        parts.append("<tr>" + "".join(f"<td{cls}>{e(v)}</td>" for v in row.values()) + "</tr>")
    parts.append("</table><h2>Where the evidence was lost</h2><ul>")
    lost = _lost(records, config.max_drop) or ["nowhere: every attacked model still verified"]
    parts += [f"<li>{e(line)}</li>" for line in lost]
    parts.append("</ul>")
    amb = _ambiguity(records)
    if amb:
        parts.append("<h2>Ambiguity attacks</h2><ul>")
        parts += [f"<li>{e(line)}</li>" for line in amb]
        parts.append("</ul>")
    if plot is not None:
        data = base64.b64encode(plot.read_bytes()).decode("ascii")
        parts.append(
            "<h2>Plots</h2><img alt='-log10 p and accuracy against attack strength' "
            f"src='data:image/png;base64,{data}'>"
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_reports(records: Sequence[dict[str, Any]], config: Any, out: Path) -> list[Path]:
    """Write results.csv, results.json, plots.png, report.md and report.html into `out`."""
    out = Path(out)
    written = [out / CSV_NAME, out / JSON_NAME]
    write_csv(records, out / CSV_NAME)
    write_json_atomic(out / JSON_NAME, {"config": config.to_dict(), "cells": list(records)})
    plot = out / PLOT_NAME
    has_plot = write_plots(records, plot, config.max_drop)
    if has_plot:
        written.append(plot)
    rows = summary_rows(records)
    write_text_atomic(out / MD_NAME, _markdown(rows, config, records, has_plot))
    write_text_atomic(out / HTML_NAME, _html(rows, config, records, plot if has_plot else None))
    return written + [out / MD_NAME, out / HTML_NAME]


def terminal_table(records: Sequence[dict[str, Any]]) -> Any:
    """Return a rich table of the cells for the terminal."""
    from rich.table import Table
    from rich.text import Text

    rows = summary_rows(records)
    table = Table(title="robustness benchmark")
    for column in rows[0] if rows else []:
        table.add_column(column)
    for row in rows:
        style = "bold red" if row["attack succeeded"] == "YES" else None
        table.add_row(*(Text(v) for v in row.values()), style=style)
    return table
