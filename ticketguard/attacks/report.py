"""The benchmark's reports: CSV and JSON of every cell, plots, Markdown and HTML, a terminal table."""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ticketguard.files import atomic_path, write_json_atomic, write_text_atomic
from ticketguard.verify.stats import format_p, security_threshold_log10

CSV_NAME, JSON_NAME, PLOT_NAME = "results.csv", "results.json", "plots.png"
MD_NAME, HTML_NAME = "report.md", "report.html"
#: Evidence left out of the summary table: W1's random-mask null cannot reach the threshold
#: with the few samples a benchmark draws, so its column would only say "not significant".
TABLE_SKIPS = ("W1 topology",)
#: What the report says of a cell whose attack left the target's mask as it was.
MASK_UNCHANGED = "mask unchanged: W2 cannot be affected"

Record = Mapping[str, Any]


def _num(value: Any) -> float | None:
    """Return a number from a record value (non-finite ones are stored as text, e.g. '-inf')."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _label(record: Record) -> str:
    return " ".join(str(record.get("label") or record.get("attack")).split())


def _params_text(record: Record) -> str:
    grid = record.get("grid") or {}
    return ", ".join(f"{k}={v}" for k, v in grid.items()) or "defaults"


def _percent(value: Any) -> str:
    v = _num(value)
    return "-" if v is None else f"{100 * v:.2f}%"


def _points(value: Any) -> str:
    v = _num(value)
    return "-" if v is None else f"{100 * v:+.2f}"


def _judged_by(record: Record) -> str | None:
    if record.get("judged_by"):
        return str(record["judged_by"])
    if record.get("winner") is not None:
        return "dispute"
    return "count" if record.get("attack") in ("key-search", "grind") else "verification"


def _count_text(record: Record) -> str:
    """Return a counting cell's result: how many tries verified, and the work to the threshold."""
    d = record.get("details") or {}
    what = "ground claims" if record.get("attack") == "grind" else "random keys"
    text = f"{d.get('verified')} of {d.get('tries')} {what} verified"
    return text + (f"; {d['work']} to verify by chance" if d.get("work") else "")


def _evidence_names(records: Sequence[Record]) -> list[str]:
    names: list[str] = []
    for r in records:
        for e in r.get("evidence") or []:
            if e["name"] not in names:
                names.append(e["name"])
    return names


def _evidence_text(e: Mapping[str, Any]) -> str:
    value = _num(e.get("log10_p"))
    if value is not None:
        return f"p = {format_p(value)}" + ("" if e.get("judged", True) else " (not judged)")
    if e.get("valid") is not None:
        return "valid" if e["valid"] else "invalid"
    return "not judged"


def _smallest(record: Record) -> tuple[str, float | None]:
    values = [
        (e["name"], _num(e.get("log10_p")))
        for e in record.get("evidence") or []
        if _num(e.get("log10_p")) is not None
    ]
    if not values:
        return "-", None
    return min(values, key=lambda item: item[1])  # type: ignore[arg-type, return-value]


def evidence_text(record: Record) -> str:
    """Return the cell's strongest evidence as text (the smallest p, a valid signature)."""
    if _judged_by(record) == "count":
        return _count_text(record)
    name, value = _smallest(record)
    parts = [] if value is None else [f"{name} p = {format_p(value)}"]
    if record.get("crypto_valid"):
        parts.append("signature valid")
    return "; ".join(parts) or "-"


def verdict_text(record: Record) -> str:
    """Return what the cell's judge decided, in words, with the evidence that decided it."""
    if record.get("error"):
        return f"error: {record['error']}"
    by = _judged_by(record)
    if by == "dispute":
        return f"dispute won by the {record.get('winner')}"
    if by == "count":
        d = record.get("details") or {}
        return f"{d.get('verified')} of {d.get('tries')} tries verified"
    if record.get("verified") is None:
        return "-"
    if not record["verified"]:
        return "NOT verified"
    decisive = record.get("decisive") or []
    return "verified" + (f" ({', '.join(decisive)})" if decisive else "")


def _succeeded_text(record: Record) -> str:
    if record.get("error") or record.get("attack_succeeded") is None:
        return "-"
    return "YES" if record["attack_succeeded"] else "no"


def summary_rows(records: Sequence[Record]) -> list[dict[str, str]]:
    """Return one display row per cell: attack, parameters, accuracy and drop, each evidence's
    p-value (or signature check), the verdict with its decisive evidence, and the outcome."""
    names = [n for n in _evidence_names(records) if n not in TABLE_SKIPS]
    rows = []
    for r in records:
        row = {
            "attack": _label(r),
            "parameters": _params_text(r),
            "seed": str(r.get("seed")),
            "accuracy": _percent(r.get("accuracy_after")),
            "drop (pts)": _points(r.get("drop")),
        }
        found = {e["name"]: e for e in r.get("evidence") or []}
        for name in names:
            row[name] = _evidence_text(found[name]) if name in found else "-"
        row["verdict"] = verdict_text(r)
        row["attack succeeded"] = _succeeded_text(r)
        row["notes"] = MASK_UNCHANGED if r.get("mask_unchanged") else ""
        rows.append(row)
    return rows


# --- CSV and JSON --------------------------------------------------------------------------------

CSV_COLUMNS = (
    "id",
    "attack",
    "label",
    "kind",
    "judged_by",
    "seed",
    "params",
    "strength",
    "strength_value",
    "accuracy_before",
    "accuracy_after",
    "drop",
    "mask_unchanged",
    "verified",
    "decisive",
    "crypto_valid",
    "evidence_survives",
    "winner",
    "attack_succeeded",
    "seconds_attack",
    "seconds_verify",
    "reason",
    "error",
)


def write_csv(records: Sequence[Record], path: Path) -> None:
    """Write one row per cell: its fields, one column per parameter, and a log10 p and a
    validity column per evidence."""
    names = _evidence_names(records)
    params: list[str] = []
    for r in records:
        params += [k for k in r.get("params") or {} if k not in params]
    columns = (
        list(CSV_COLUMNS)
        + [f"param {p}" for p in params]
        + [f"{n} log10_p" for n in names]
        + [f"{n} valid" for n in names]
    )
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            row = {k: r.get(k) for k in CSV_COLUMNS}
            row["judged_by"] = _judged_by(r)
            row["params"] = json.dumps(r.get("params"), sort_keys=True)
            row["decisive"] = "; ".join(r.get("decisive") or [])
            for k, v in (r.get("params") or {}).items():
                row[f"param {k}"] = v
            for e in r.get("evidence") or []:
                row[f"{e['name']} log10_p"] = e.get("log10_p")
                row[f"{e['name']} valid"] = e.get("valid")
            writer.writerow(row)


# --- plots ---------------------------------------------------------------------------------------


def _plotted(records: Sequence[Record]) -> dict[str, list[Record]]:
    """Group the cells judged by verification into panels, one per attack (or label)."""
    panels: dict[str, list[Record]] = {}
    for r in records:
        if r.get("error") or _judged_by(r) != "verification":
            continue
        panels.setdefault(_label(r), []).append(r)
    return panels


def _neg_log10_p(record: Record, name: str) -> float | None:
    for e in record.get("evidence") or []:
        if e["name"] == name:
            value = _num(e.get("log10_p"))
            return None if value is None else -value
    return None


def _positions(cells: Sequence[Record]) -> tuple[dict[str, float], list[str] | None]:
    """Map each cell's strength value to an x position; non-numeric values become categories."""
    values = [c.get("strength_value") for c in cells]
    if all(_num(v) is not None for v in values):
        return {json.dumps(v): float(_num(v)) for v in values}, None  # type: ignore[arg-type]
    names = list(dict.fromkeys("defaults" if v is None else str(v) for v in values))
    return {
        json.dumps(v): float(names.index("defaults" if v is None else str(v))) for v in values
    }, names


def write_plots(
    records: Sequence[Record],
    path: Path,
    max_drop: float,
    alpha: float | None = None,
    security_bits: int = 0,
) -> bool:
    """Draw -log10 p of each evidence and the clean accuracy against the attack's strength, a
    panel per attack; lines are the other parameters' settings, averaged over seeds (single
    seeds as points). The threshold is each cell's own, else 2^-security_bits (alpha when
    security_bits is 0). Return False when no cell can be plotted (then nothing is written)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _plotted(records)
    if not panels:
        return False
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols, 4.0 * rows), squeeze=False)
    markers = "osD^vP*Xh"
    for ax, (label, cells) in zip(axes.flat, panels.items(), strict=False):
        strength = cells[0].get("strength")
        where, categories = _positions(cells)
        threshold = next(
            (-t for c in cells if (t := _num(c.get("threshold_log10"))) is not None), None
        )
        if threshold is None and security_bits:
            threshold = -security_threshold_log10(security_bits, 1)
        elif threshold is None and alpha is not None:
            threshold = -math.log10(alpha)
        bits = next((b for c in cells if (b := c.get("security_bits")) is not None), security_bits)
        rule = f"2^-{bits}/m" if bits else "alpha/m"
        finite = [
            y
            for c in cells
            for n in _evidence_names([c])
            if (y := _neg_log10_p(c, n)) is not None and math.isfinite(y)
        ]
        # p = 0 (log10 p = -inf) is drawn on a ceiling above everything finite.
        ceiling = 1.5 * max([threshold or 10.0, *finite]) + 1
        twin = ax.twinx()
        # A line per setting of the other parameters that vary in this panel.
        varying = [
            k
            for k in dict.fromkeys(k for c in cells for k in c.get("grid") or {})
            if k != strength and len({json.dumps((c.get("grid") or {}).get(k)) for c in cells}) > 1
        ]
        variants: dict[str, list[Record]] = {}
        for c in cells:
            rest = {k: (c.get("grid") or {}).get(k) for k in varying}
            variants.setdefault(", ".join(f"{k}={v}" for k, v in rest.items()), []).append(c)
        clipped = False
        for v_index, (variant, group) in enumerate(variants.items()):
            xs = sorted({where[json.dumps(c.get("strength_value"))] for c in group})
            at = {
                x: [c for c in group if where[json.dumps(c.get("strength_value"))] == x] for x in xs
            }
            for e_index, name in enumerate(_evidence_names(group)):
                means, points = [], []
                for x in xs:
                    ys = [y for c in at[x] if (y := _neg_log10_p(c, name)) is not None]
                    ys = [min(y, ceiling) for y in ys]
                    clipped = clipped or any(y == ceiling for y in ys)
                    means.append(sum(ys) / len(ys) if ys else math.nan)
                    points += [(x, y) for y in ys] if len(ys) > 1 else []
                if all(math.isnan(m) for m in means):
                    continue
                tag = name + (f" ({variant})" if variant else "")
                line = ax.plot(
                    xs, means, marker=markers[(v_index * 3 + e_index) % len(markers)], label=tag
                )[0]
                if points:
                    ax.scatter(*zip(*points, strict=True), s=10, color=line.get_color(), alpha=0.5)
            accs = []
            for x in xs:
                found = [a for c in at[x] if (a := _num(c.get("accuracy_after"))) is not None]
                accs.append(100 * sum(found) / len(found) if found else math.nan)
            twin.plot(
                xs,
                accs,
                color="black",
                linestyle=":",
                marker="x",
                alpha=0.7,
                label="accuracy" + (f" ({variant})" if variant else ""),
            )
        if threshold is not None:
            ax.axhline(
                threshold, color="red", linestyle="--", linewidth=1, label=f"threshold ({rule})"
            )
        if clipped:
            ax.axhline(ceiling, color="grey", linewidth=0.5, label="p = 0 (clipped)")
        before = next((b for c in cells if (b := _num(c.get("accuracy_before"))) is not None), None)
        if before is not None:
            twin.axhline(
                100 * (before - max_drop),
                color="grey",
                linestyle="-.",
                linewidth=1,
                label=f"accuracy floor (max_drop {100 * max_drop:g} pts)",
            )
        ax.set_yscale("symlog", linthresh=10)
        ax.set_ylim(0, 1.1 * ceiling)
        twin.set_ylim(0, 100)
        if categories is not None:
            ax.set_xticks(range(len(categories)), categories)
        ax.set_title(label)
        ax.set_xlabel(strength or "(no strength parameter)")
        ax.set_ylabel("-log10 p")
        twin.set_ylabel("clean test accuracy %")
        handles = ax.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        twin.legend(handles[0] + more[0], handles[1] + more[1], fontsize=6, loc="best")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True


# --- what the report says ------------------------------------------------------------------------


def _passed(record: Record) -> set[str]:
    """Return the evidence that decided the cell's verdict (p below threshold, valid signature)."""
    return set(record.get("decisive") or [])


def lost_lines(records: Sequence[Record], max_drop: float, baseline: Record | None) -> list[str]:
    """Say, for every cell judged by verification, which of the target's decisive evidence the
    attack removed, whether the owner still verified, and what it cost the model."""
    before = _passed(baseline) if baseline and not baseline.get("error") else None
    lines = []
    for r in records:
        if r.get("error") or _judged_by(r) != "verification":
            continue
        found = {e["name"]: e for e in r.get("evidence") or []}
        if before is not None:
            gone = sorted(before - _passed(r))
        else:
            gone = sorted(n for n, e in found.items() if r.get("verified") is False)
        if not gone and r.get("verified"):
            continue
        what = ", ".join(
            f"{n} ({_evidence_text(found[n]) if n in found else 'absent'})" for n in gone
        )
        head = f"{_label(r)} ({_params_text(r)}, seed {r.get('seed')}): "
        if r.get("verified"):
            lines.append(
                f"{head}lost {what}; still verified by {', '.join(r.get('decisive') or [])}"
            )
            continue
        drop = _num(r.get("drop"))
        cost = (
            "with the accuracy within bounds: the attack succeeded"
            if r.get("attack_succeeded")
            else f"but the accuracy fell by {100 * (drop or 0.0):.2f} points (more than "
            f"{100 * max_drop:g}): the attack fails"
        )
        lines.append(f"{head}NOT verified, lost {what or 'all evidence'} {cost}")
    return lines


def ambiguity_lines(records: Sequence[Record]) -> list[str]:
    """Say what the disputes decided and how many random keys verified."""
    lines = []
    for r in records:
        if r.get("error"):
            continue
        by = _judged_by(r)
        if by == "dispute":
            lines.append(
                f"{_label(r)} ({_params_text(r)}, seed {r.get('seed')}): the dispute names the "
                f"{r.get('winner')}"
                + (f" (accuracy of the attacker's model {_percent(r.get('accuracy_after'))})")
                + ": "
                + "; ".join(r.get("reasoning") or [])
            )
        elif by == "count" and r.get("attack") == "grind":
            d = r.get("details") or {}
            best = d.get("best") or {}
            lines.append(
                f"{_label(r)} ({_params_text(r)}, seed {r.get('seed')}): {_count_text(r)} "
                f"({d.get('tries_per_second', 0):,.0f} tries/s; best claim {best.get('statistic')},"
                f" p = {best.get('p')}; the threshold is {d.get('rule')})"
            )
        elif by == "count":
            d = r.get("details") or {}
            best = d.get("smallest_log10_p") or {}
            shown = ", ".join(
                f"{k} p = {format_p(v)}" for k, v0 in best.items() if (v := _num(v0)) is not None
            )
            bits = d.get("security_bits")
            level = f"2^-{bits}" if bits else "alpha"
            bound = _num(d.get("bound"))
            lines.append(
                f"{_label(r)} ({_params_text(r)}, seed {r.get('seed')}): {d.get('verified')} "
                f"of {d.get('tries')} random keys verified (bound tries x {level} = "
                f"{d.get('bound') if bound is None else f'{bound:.3g}'}"
                + (f"; smallest {shown})" if shown else ")")
            )
    return lines


def baseline_line(baseline: Record | None) -> str | None:
    """Describe the unattacked target's verification, which every attack starts from."""
    if not baseline:
        return None
    if baseline.get("error"):
        return f"the unattacked target could not be verified: {baseline['error']}"
    found = ", ".join(f"{e['name']} {_evidence_text(e)}" for e in baseline.get("evidence") or [])
    return (
        f"the unattacked target: accuracy {_percent(baseline.get('accuracy_after'))}, "
        f"{verdict_text(baseline)}; {found}"
    )


def mask_lines(records: Sequence[Record]) -> list[str]:
    """Name the cells whose attack left the target's mask unchanged (W2 untested by them)."""
    return [
        f"{_label(r)} ({_params_text(r)}, seed {r.get('seed')}): {MASK_UNCHANGED}"
        for r in records
        if r.get("mask_unchanged") and not r.get("error")
    ]


#: Why the cells of `mask_lines` say nothing about W2's robustness.
MASK_NOTE = (
    "these attacks kept the target's mask exactly (its non-zero weights in every masked layer), "
    "and W2 lives in the mask: that W2 survives them is no evidence that it survives attacks "
    "that change the mask"
)


def _settings(config: Any) -> list[str]:
    bits = config.security_bits
    if bits:
        rule = (
            f"statistical evidence decides at p <= 2^-{bits}/m (the {bits}-bit security level, "
            f"Bonferroni over each verification's m pieces of evidence): a claimant who can "
            f"retry needs about 2^{bits} tries to forge it; alpha = {config.alpha:g} applies "
            "only to a claim proven to predate the suspect, and ticketguard has no proof of "
            "time yet"
        )
    else:
        rule = (
            f"alpha = {config.alpha:g} (Bonferroni over each verification's m pieces of "
            "evidence: threshold alpha/m; security level off, so this holds only for claims "
            "proven to predate the suspect)"
        )
    return [
        rule,
        f"an attack succeeds only if the owner's evidence is lost and the accuracy drop is at "
        f"most {100 * config.max_drop:g} points (max_drop = {config.max_drop:g})",
        f"the attacker's data fraction {config.data_fraction:g}; seeds "
        f"{', '.join(str(s) for s in config.seeds)}; channel alignment to the owner's ticket "
        f"{'on' if config.reference else 'off'}; black-box queries "
        f"{'on' if config.blackbox else 'off'}",
    ]


def _md(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _markdown(
    rows: list[dict[str, str]],
    config: Any,
    records: Sequence[Record],
    baseline: Record | None,
    plot: bool,
) -> str:
    head = list(rows[0]) if rows else []
    lines = [
        f"# ticketguard robustness benchmark: {_md(config.name)}",
        "",
        f"- target: `{config.ticket}` (credential `{config.credential}`)",
        *(f"- {_md(s)}" for s in _settings(config)),
    ]
    first = baseline_line(baseline)
    if first:
        lines.append(f"- {_md(first)}")
    lines += ["", "## Results", ""]
    if head:
        lines += ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
        lines += ["| " + " | ".join(_md(v) for v in row.values()) + " |" for row in rows]
    lost = lost_lines(records, config.max_drop, baseline)
    lines += ["", "## Where the evidence was lost", ""]
    lines += [f"- {_md(line)}" for line in lost] or [
        "- nowhere: every attacked model kept all of the target's decisive evidence"
    ]
    unchanged = mask_lines(records)
    if unchanged:
        lines += ["", "## Mask unchanged", "", _md(MASK_NOTE[0].upper() + MASK_NOTE[1:]) + ".", ""]
        lines += [f"- {_md(line)}" for line in unchanged]
    amb = ambiguity_lines(records)
    if amb:
        lines += ["", "## Ambiguity attacks", ""] + [f"- {_md(line)}" for line in amb]
    if plot:
        lines += [
            "",
            "## Plots",
            "",
            f"![-log10 p and accuracy against attack strength]({PLOT_NAME})",
        ]
    return "\n".join(lines) + "\n"


def _html(
    rows: list[dict[str, str]],
    config: Any,
    records: Sequence[Record],
    baseline: Record | None,
    plot: Path | None,
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
        f"<ul><li>target: <code>{e(str(config.ticket))}</code> (credential "
        f"<code>{e(str(config.credential))}</code>)</li>",
        *(f"<li>{e(s)}</li>" for s in _settings(config)),
    ]
    first = baseline_line(baseline)
    if first:
        parts.append(f"<li>{e(first)}</li>")
    parts.append("</ul><h2>Results</h2><table><tr>")
    parts.append("".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
    for row in rows:
        cls = " class='yes'" if row.get("attack succeeded") == "YES" else ""
        parts.append("<tr>" + "".join(f"<td{cls}>{e(v)}</td>" for v in row.values()) + "</tr>")
    parts.append("</table><h2>Where the evidence was lost</h2><ul>")
    lost = lost_lines(records, config.max_drop, baseline) or [
        "nowhere: every attacked model kept all of the target's decisive evidence"
    ]
    parts += [f"<li>{e(line)}</li>" for line in lost]
    parts.append("</ul>")
    unchanged = mask_lines(records)
    if unchanged:
        parts.append(f"<h2>Mask unchanged</h2><p>{e(MASK_NOTE[0].upper() + MASK_NOTE[1:])}.</p>")
        parts.append("<ul>" + "".join(f"<li>{e(line)}</li>" for line in unchanged) + "</ul>")
    amb = ambiguity_lines(records)
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


REPORT_NAMES = (CSV_NAME, JSON_NAME, PLOT_NAME, MD_NAME, HTML_NAME)


def bench_lock(out: str | Path, *, notes: list[str] | None = None) -> Any:
    """A context manager holding the bench folder's lock (`out/.ticketguard.lock`) for a whole
    run: another run on `out` refuses with one line; an interrupted report commit is finished
    first (a line each in `notes`). `write_reports` takes the same lock again (re-entrant)."""
    from ticketguard.files import directory_key, hold_outputs

    out = Path(out)
    members = [out / n for n in REPORT_NAMES]
    return hold_outputs(directory_key(out), members, label=str(out), notes=notes)


def write_reports(
    records: Sequence[Record], config: Any, out: Path, *, baseline: Record | None = None
) -> list[Path]:
    """Write results.csv, results.json, plots.png (when some cell can be plotted), report.md
    and report.html into `out`; return the paths written.

    The reports are one output set (ticketguard.files.writing, key `out/.ticketguard.*`): they
    are staged and committed at once, so a crash leaves the previous reports or, once the next
    run on `out` has finished the journal, these; a stale plot is removed in the same commit.
    Another run writing reports into `out` meanwhile is waited for.
    """
    from ticketguard.files import directory_key, writing

    out = Path(out)
    written = [out / CSV_NAME, out / JSON_NAME]
    with writing(
        directory_key(out), [out / n for n in REPORT_NAMES], label=str(out), wait=True
    ) as files:
        write_csv(records, files.stage(out / CSV_NAME))
        write_json_atomic(
            files.stage(out / JSON_NAME),
            {"config": config.to_dict(), "baseline": baseline, "cells": list(records)},
        )
        plot = out / PLOT_NAME
        staged_plot = files.stage(plot)
        has_plot = write_plots(
            records, staged_plot, config.max_drop, config.alpha, config.security_bits
        )
        if has_plot:
            written.append(plot)
        else:
            files.unstage(plot)
            files.remove(plot)  # an earlier run's plot would not match these cells
        rows = summary_rows(records)
        write_text_atomic(
            files.stage(out / MD_NAME), _markdown(rows, config, records, baseline, has_plot)
        )
        write_text_atomic(
            files.stage(out / HTML_NAME),
            _html(rows, config, records, baseline, staged_plot if has_plot else None),
        )
    return written + [out / MD_NAME, out / HTML_NAME]


def terminal_table(records: Sequence[Record]) -> Any:
    """Return a rich table of the cells for the terminal (successful attacks in red)."""
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
