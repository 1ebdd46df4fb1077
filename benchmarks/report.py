"""Draws the plots of docs/benchmarks.md from the saved results in benchmarks/results/.

    python -m benchmarks.report [--results DIR] [--img DIR] [--doc FILE]

Each ``*.json`` under the results folder is the output of one benchmark run (``python -m
benchmarks.<name> --json`` or ``kvservice bench ... --json``, saved by hand). The benchmarks
do not share a schema, so the report reads their shape instead of their names:

* a *table* is a list of objects (one row each), an object of objects (one row per key),
  or the plain numbers at the top of the file (one row);
* a field whose name ends in a unit (``_us``, ``_ms``, ``_gbps``, ``_pct``, ``tok_s``, ...) is
  a measurement; other numbers at the top of a file are measurements too; inside rows,
  strings, booleans and integers without a unit are the row's settings and label it;
* provenance fields (card, versions, date, ...) are not plotted but quoted in the doc.

Each table becomes one PNG in the image folder, with one bar chart per unit (so a kernel
and its baseline, both in microseconds, stand side by side). A file that cannot be read or
holds nothing to draw is reported and skipped; the report never fails on one file. The
section of the doc between the two report markers is rewritten to list every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
IMG_DIR = ROOT / "docs" / "img"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- report:begin (python -m benchmarks.report rewrites this section) -->"
END = "<!-- report:end -->"

PROVENANCE = (
    "benchmark", "name", "card", "device", "gpu", "gpus", "cpu", "host", "date", "timestamp",
    "versions", "version", "git", "commit", "python", "torch", "triton", "ray", "cuda", "notes",
    "sms", "l2_mib",
)
MAX_ROWS = 40

# Units a field name may carry as a word ("decode_step_us", "waste_pct_paged", "p99_ms").
# Rates first: they are two words ("tok_s", "ops_per_s").
_RATE_UNITS = (
    ("tokens_per_s", "tokens/s"), ("tok_per_s", "tokens/s"), ("tokens_s", "tokens/s"),
    ("tok_s", "tokens/s"), ("ops_per_s", "ops/s"), ("ops_s", "ops/s"), ("_per_s", "1/s"),
)
_WORD_UNITS = {
    "ns": "ns", "us": "us", "ms": "ms", "seconds": "s", "pct": "%", "percent": "%",
    "gbps": "GB/s", "tbps": "TB/s", "tflops": "TFLOP/s", "gib": "GiB", "mib": "MiB",
    "bytes": "bytes", "ratio": "x", "speedup": "x",
}
# Too short to trust anywhere but at the end of a name.
_LAST_WORD_UNITS = {"s": "s", "x": "x"}


@dataclass
class Table:
    title: str
    labels: list[str]
    # unit -> field -> one value per row (None where a row lacks the field)
    series: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)


@dataclass
class Figure:
    source: Path
    table: Table
    image: Path


def unit_of(name: str) -> str | None:
    """The unit a field name carries, or None."""
    lower = name.lower()
    for suffix, unit in _RATE_UNITS:
        if lower.endswith(suffix):
            return unit
    words = lower.split("_")
    if "over" in words[1:-1]:  # "ours_over_sdpa": a ratio
        return "x"
    if words[-1] in _LAST_WORD_UNITS and len(words) > 1:
        return _LAST_WORD_UNITS[words[-1]]
    for word in reversed(words):
        if word in _WORD_UNITS:
            return _WORD_UNITS[word]
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _table(title: str, rows: list[dict[str, Any]], *, top_level: bool = False) -> Table | None:
    rows = [_flatten(row) for row in rows[:MAX_ROWS]]
    labels: list[str] = []
    measured: dict[str, str] = {}
    for row in rows:
        settings = []
        for key, value in row.items():
            unit = unit_of(key.rsplit(".", 1)[-1]) or unit_of(key)
            if _is_number(value) and (unit or top_level or isinstance(value, float)):
                measured.setdefault(key, unit or "value")
            elif isinstance(value, str | bool | int):
                settings.append(f"{key}={value}" if not isinstance(value, str) else value)
        labels.append(" ".join(settings) or str(len(labels)))
    if not measured:
        return None
    table = Table(title, labels)
    for key, unit in measured.items():
        values = [row.get(key) for row in rows]
        table.series.setdefault(unit, {})[key] = [v if _is_number(v) else None for v in values]
    return table


def tables_of(data: Any, title: str = "") -> list[Table]:
    """Every table in one result document (see the module docstring)."""
    found: list[Table] = []
    if isinstance(data, list):
        rows = [row for row in data if isinstance(row, dict)]
        if rows and (table := _table(title, rows)) is not None:
            found.append(table)
        return found
    if not isinstance(data, dict):
        return found
    scalars = {k: v for k, v in data.items() if _is_number(v) and k not in PROVENANCE}
    if scalars and (table := _table(title, [scalars], top_level=True)) is not None:
        found.append(table)
    for key, value in data.items():
        if key in PROVENANCE:
            continue
        name = f"{title}.{key}" if title else key
        if isinstance(value, list):
            found += tables_of(value, name)
        elif isinstance(value, dict):
            rows = _keyed_rows(value, "")
            if rows and (table := _table(name, rows)) is not None:
                found.append(table)
            else:
                found += tables_of(value, name)
    return found


def _keyed_rows(obj: dict[str, Any], label: str) -> list[dict[str, Any]] | None:
    """An object of objects as rows labelled by their keys ("create c8"), or None.

    The rows are the innermost objects that hold numbers themselves; deeper objects inside
    a row are flattened into it.
    """
    if not obj or not all(isinstance(v, dict) for v in obj.values()):
        return None
    rows: list[dict[str, Any]] = []
    for key, child in obj.items():
        child_label = f"{label} {key}".strip()
        if any(_is_number(v) for v in child.values()):
            rows.append({"row": child_label, **{k: v for k, v in child.items() if k != "row"}})
            continue
        deeper = _keyed_rows(child, child_label)
        if deeper is None:
            return None
        rows += deeper
    return rows


def provenance(data: Any) -> str:
    """One line naming the card, versions and date of a run, from whatever fields it has."""
    if not isinstance(data, dict):
        return ""
    parts = []
    for key in PROVENANCE:
        value = data.get(key)
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        if value not in (None, "", [], {}):
            parts.append(f"{key}: {value}")
    return "; ".join(parts)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def draw(table: Table, image: Path, heading: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    units = list(table.series)
    num_rows = len(table.labels)
    # Two charts side by side; each row of charts as tall as its bars need.
    num_cols = min(2, len(units))
    grid = [units[i : i + num_cols] for i in range(0, len(units), num_cols)]
    heights = [
        max(1.8, 0.16 * num_rows * max(len(table.series[u]) for u in row) + 1.0) for row in grid
    ]
    fig, axes = plt.subplots(
        len(grid), num_cols, figsize=(7 * num_cols, sum(heights)),
        gridspec_kw={"height_ratios": heights}, squeeze=False,
    )  # fmt: skip
    for ax in axes.flat[len(units) :]:
        ax.set_visible(False)
    for ax, unit in zip(axes.flat, units, strict=False):
        fields = table.series[unit]
        bar = 0.8 / len(fields)
        values_seen: list[float] = []
        for index, (name, values) in enumerate(fields.items()):
            ys = [row + (index - (len(fields) - 1) / 2) * bar for row in range(num_rows)]
            xs = [v if v is not None else 0.0 for v in values]
            values_seen += [v for v in values if v is not None]
            ax.barh(ys, xs, height=bar, label=name)
        ax.set_yticks(range(num_rows), table.labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(unit)
        positive = [v for v in values_seen if v > 0]
        if positive and max(positive) / min(positive) > 100 and min(values_seen) >= 0:
            ax.set_xscale("log")
        ax.grid(axis="x", alpha=0.3)
        if len(fields) > 1 or len(units) > 1:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(heading, fontsize=10)
    fig.tight_layout()
    image.parent.mkdir(parents=True, exist_ok=True)
    # No "Software" stamp: the same results give byte-identical images.
    fig.savefig(image, dpi=110, metadata={"Software": None})
    plt.close(fig)


def build(results: Path, img: Path) -> tuple[list[Figure], list[tuple[Path, str]], dict[Path, str]]:
    """Draws every figure; returns (figures, skipped files with the reason, provenance)."""
    figures: list[Figure] = []
    skipped: list[tuple[Path, str]] = []
    origin: dict[Path, str] = {}
    for path in sorted(results.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            skipped.append((path, f"unreadable: {exc}"))
            continue
        tables = tables_of(data)
        if not tables:
            skipped.append((path, "no numbers to plot"))
            continue
        origin[path] = provenance(data)
        for table in tables:
            stem = path.stem if not table.title else f"{path.stem}-{_slug(table.title)}"
            image = img / f"{stem}.png"
            heading = f"{path.stem}: {table.title}" if table.title else path.stem
            draw(table, image, heading)
            figures.append(Figure(path, table, image))
    return figures, skipped, origin


def section(
    figures: list[Figure], skipped: list[tuple[Path, str]], origin: dict[Path, str], doc: Path
) -> str:
    """The Markdown between the report markers."""
    if not figures:
        lines = ["No results in benchmarks/results/ yet."]
    else:
        lines = []
        for source in dict.fromkeys(fig.source for fig in figures):
            lines += [f"### {source.stem}", "", f"From `{_relative(source, doc.parent.parent)}`."]
            if origin.get(source):
                lines.append(f"Run: {origin[source]}.")
            lines.append("")
            for fig in (f for f in figures if f.source == source):
                alt = fig.table.title or source.stem
                lines += [f"![{alt}]({_relative(fig.image, doc.parent)})", ""]
    for path, reason in skipped:
        lines.append(f"- Skipped `{path.name}`: {reason}.")
    return "\n".join(lines).strip()


def _relative(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def linked_images(doc: Path) -> set[Path]:
    """The images the doc's report section links to now."""
    text = doc.read_text() if doc.exists() else ""
    if BEGIN not in text or END not in text:
        return set()
    body = text.split(BEGIN, 1)[1].split(END, 1)[0]
    return {(doc.parent / link).resolve() for link in re.findall(r"\]\(([^)]+\.png)\)", body)}


def update_doc(doc: Path, body: str) -> None:
    """Rewrites the text between the markers (appending the markers if they are missing)."""
    text = doc.read_text() if doc.exists() else ""
    block = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of *.json results")
    parser.add_argument("--img", type=Path, default=IMG_DIR, help="folder to write the PNGs to")
    parser.add_argument("--doc", type=Path, default=DOC, help="Markdown file whose report section to rewrite")
    args = parser.parse_args(argv)
    before = linked_images(args.doc)
    figures, skipped, origin = build(args.results, args.img)
    update_doc(args.doc, section(figures, skipped, origin, args.doc))
    # Plots of result files that are gone go too; other images in the folder are not ours.
    for stale in before - linked_images(args.doc):
        stale.unlink(missing_ok=True)
    print(f"{'result file':<32} {'tables':>6}  images")
    for source in dict.fromkeys(fig.source for fig in figures):
        mine = [fig for fig in figures if fig.source == source]
        print(f"{source.name:<32} {len(mine):>6}  {', '.join(f.image.name for f in mine)}")
    for path, reason in skipped:
        print(f"{path.name:<32} {'-':>6}  skipped: {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
