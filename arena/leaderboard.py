"""Leaderboards from run records: BoB-style z-score aggregation, ranks, and publication.

    arena leaderboard outputs/battles/default [--out DIR] [--bench bench.csv ...]

Aggregation (Battle of the Backbones, Goldblum et al. 2023). A *setting* s is a task type x dataset
x mode x metric; one record can score several (``record_settings``): its task's primary metric,
mask AP beside box AP for detection, and each OOD test set as a setting of task type ``ood``. The
task types are BoB's five: classification (fine-tune, linear probe, kNN), detection, segmentation,
retrieval and ood. For backbone b with seeds k = 1..n_bs, m_bs = mean_k metric_bsk.
Across the backbones B_s present in s: z_bs = (m_bs - mean_{b' in B_s} m_b's) / std_{b' in B_s} m_b's
(population std; z = 0 when all backbones tie). The task score is the mean of z_bs over the
task's settings the backbone has, and the overall score the mean of task scores over the tasks
it has. A backbone that lacks a setting is never filled in: its ``coverage`` column says how
many settings it has, it gets no rank (ranks are among full-coverage backbones only) and the
missing cells are listed. Failed cells are listed with their error and not scored.

Only ``metrics.json`` records are read; for one backbone x setting x seed the newest record
counts. Efficiency columns come from the records (params, FLOPs) and, when given, from
``arena bench`` CSVs (throughput and peak memory at the records' resolution).
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from .records import find_records

SETTING = ["task", "dataset", "mode", "metric"]
# (upper bound in parameters, label) of the size tiers, by backbone parameters
SIZE_TIERS = ((10e6, "<10M"), (30e6, "10-30M"), (90e6, "30-90M"), (math.inf, ">=90M"))


def size_tier(params: float) -> str:
    if not np.isfinite(params):
        return "?"
    return next(label for bound, label in SIZE_TIERS if params < bound)


def setting_name(task: str, dataset: str, mode: str, metric: str) -> str:
    return f"{task}/{dataset}/{mode}:{metric}"


@dataclass
class Leaderboard:
    """``table``: one row per backbone; ``cells``: one row per backbone x setting (mean, std, seeds, z);
    ``missing``: backbone x setting pairs without a complete record; ``failed``: failed records;
    ``bench``: the ``arena bench`` rows used, if any."""

    table: pd.DataFrame
    cells: pd.DataFrame
    missing: pd.DataFrame
    failed: pd.DataFrame
    bench: pd.DataFrame | None
    efficiency_axis: str  # the x axis of the Pareto front: infer_samples_per_sec or gflops


def record_settings(record: dict[str, Any]) -> list[tuple[str, str, str, float]]:
    """The settings one record scores, as (task type, dataset, metric, value).

    The task's primary metric (NaN when missing); a detection record's mask AP (``segm_map``) as
    a second detection setting; each OOD test set's primary metric (``ood/<name>/<metric>``) as a
    setting of task type ``ood`` on dataset ``<dataset>><name>``.
    """
    metric, metrics, dataset = record.get("primary_metric") or "", record["metrics"], record["dataset"]
    out = [(record["task"], dataset, metric, metrics.get(metric, np.nan))]
    if record["task"] == "detection" and "segm_map" in metrics:
        out.append(("detection", dataset, "segm_map", metrics["segm_map"]))
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "ood" and parts[2] == metric:
            out.append(("ood", f"{dataset}>{parts[1]}", metric, value))
    return out


def records_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per setting a record scores (``record_settings``), its value as ``value``."""
    rows = []
    for r in records:
        for task, dataset, metric, value in record_settings(r):
            rows.append({
                "backbone": r["backbone"], "family": r["family"], "task": task, "dataset": dataset,
                "mode": r["mode"], "seed": int(r["seed"]), "status": r["status"], "metric": metric,
                "value": value, "params": r.get("params"), "flops": r.get("flops"),
                "image_size": r.get("image_size"), "created": r.get("created", ""), "error": r.get("error"),
                "run_dir": r.get("run_dir"),
            })
    cols = ["backbone", "family", "task", "dataset", "mode", "seed", "status", "metric", "value", "params",
            "flops", "image_size", "created", "error", "run_dir"]
    df = pd.DataFrame(rows, columns=cols)
    for c in ("value", "params", "flops", "image_size"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def zscores(means: pd.Series) -> pd.Series:
    """z-scores of one setting's per-backbone means (population std; all zero when they tie)."""
    std = means.std(ddof=0)
    if not np.isfinite(std) or std == 0:
        return means * 0.0
    return (means - means.mean()) / std


def pareto_front(x: pd.Series, y: pd.Series, *, x_higher_better: bool = True) -> pd.Series:
    """True where no other point is at least as good on both axes and better on one (y: higher is better)."""
    xs = x if x_higher_better else -x
    ok = xs.notna() & y.notna()
    front = pd.Series(False, index=x.index)
    for i in x.index[ok]:
        ge = (xs[ok] >= xs[i]) & (y[ok] >= y[i])
        gt = (xs[ok] > xs[i]) | (y[ok] > y[i])
        front[i] = not (ge & gt).any()
    return front


def _measured(bench: pd.DataFrame) -> pd.DataFrame:
    """The ``arena bench`` rows without an error."""
    return bench[bench["error"].isna()] if "error" in bench else bench


def _bench_columns(bench: pd.DataFrame, table: pd.DataFrame, image_sizes: pd.Series) -> pd.DataFrame:
    """The bench row of each backbone at its records' resolution (NaN when it was not benchmarked there)."""
    ok = _measured(bench)
    cols = ["infer_samples_per_sec", "infer_peak_mem_mb", "train_samples_per_sec", "train_peak_mem_mb"]
    out = pd.DataFrame(index=table.index, columns=cols, dtype=float)
    for i, name in table["backbone"].items():
        rows = ok[(ok["model"] == name) & (ok["infer_img_size"] == image_sizes.get(name))]
        if len(rows):
            out.loc[i, cols] = rows.iloc[-1].reindex(cols).astype(float).values
    return out


def build_leaderboard(records: Iterable[dict[str, Any]], bench: pd.DataFrame | None = None) -> Leaderboard:
    """Aggregate run records into the leaderboard (see the module docstring for the formula)."""
    df = records_frame(records)
    if df.empty:
        raise ValueError("no run records to aggregate; point the leaderboard at a directory holding metrics.json files")
    key = ["backbone", *SETTING, "seed"]
    df = df.sort_values("created").drop_duplicates(key + ["status"], keep="last")
    done = df[df["status"] == "complete"]
    no_metric = done[done["value"].isna()]
    done = done[done["value"].notna()]
    failed = df[df["status"] == "failed"]
    failed = failed[~failed.set_index(key).index.isin(done.set_index(key).index)]
    no_metric = no_metric.assign(error=lambda d: "primary metric " + d["metric"] + " missing from the record")
    failed = pd.concat([failed, no_metric])[key + ["error", "run_dir"]].reset_index(drop=True)

    cells = (done.groupby(["backbone", *SETTING])
             .agg(mean=("value", "mean"), std=("value", "std"), seeds=("seed", "nunique"))
             .reset_index())
    cells["z"] = cells.groupby(SETTING)["mean"].transform(zscores)
    settings = cells[SETTING].drop_duplicates().sort_values(SETTING)
    tasks = sorted(settings["task"].unique())

    everyone = pd.concat([done, failed.assign(status="failed")])["backbone"].unique()
    grid = pd.MultiIndex.from_product([sorted(everyone), [tuple(s) for s in settings.itertuples(index=False)]])
    have = set(zip(cells["backbone"], zip(*(cells[c] for c in SETTING))))
    missing = pd.DataFrame([(b, *s) for b, s in grid if (b, s) not in have], columns=["backbone", *SETTING])

    per_task = cells.groupby(["backbone", "task"])["z"].mean().unstack("task").reindex(columns=tasks)
    info = df.groupby("backbone").agg(family=("family", "first"), params=("params", "median"),
                                      flops=("flops", "median"), image_size=("image_size", "median"))
    table = info.reindex(sorted(everyone)).reset_index().rename(columns={"index": "backbone"})
    table["size"] = table["params"].map(size_tier)
    table["params_m"] = (table["params"] / 1e6).round(3)
    table["gflops"] = (table["flops"] / 1e9).round(4)
    n_settings = cells.groupby("backbone").size()
    table["coverage"] = [f"{int(n_settings.get(b, 0))}/{len(settings)}" for b in table["backbone"]]
    full = table["backbone"].map(lambda b: n_settings.get(b, 0) == len(settings))
    table["score"] = table["backbone"].map(per_task.mean(axis=1)).astype(float)
    table["rank"] = table["score"].where(full).rank(ascending=False, method="min")
    for task in tasks:
        table[f"score_{task}"] = table["backbone"].map(per_task[task]).astype(float)
    for s in settings.itertuples(index=False):
        sel = cells[(cells[SETTING] == tuple(s)).all(axis=1)]
        name = setting_name(*s)
        by = sel.set_index("backbone")
        table[name] = table["backbone"].map(by["mean"])
        table[f"{name}_std"] = table["backbone"].map(by["std"])
    table["seeds"] = table["backbone"].map(cells.groupby("backbone")["seeds"].min()).astype("Int64")

    axis = "gflops"
    if bench is not None and len(bench):
        table = table.join(_bench_columns(bench, table, info["image_size"]))
        if table["infer_samples_per_sec"].notna().any():
            axis = "infer_samples_per_sec"
    table["pareto"] = pareto_front(table[axis], table["score"], x_higher_better=axis != "gflops")
    table = table.sort_values(["rank", "score"], ascending=[True, False], na_position="last").reset_index(drop=True)
    front = ["rank", "backbone", "family", "size", "params_m", "gflops", "coverage", "score"]
    table = table[front + [c for c in table.columns if c not in front + ["params", "flops", "image_size"]]]
    return Leaderboard(table, cells, missing, failed, bench, axis)


# --- rendering -------------------------------------------------------------------------------------------

def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)) or v is pd.NA:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "✓" if v else ""
    if isinstance(v, (float, np.floating)):
        return f"{v:.{digits}f}"
    return str(v)


def display_table(board: Leaderboard) -> pd.DataFrame:
    """The table as strings, with each setting's metric shown as mean ± std over seeds."""
    t = board.table
    out = pd.DataFrame(index=t.index)
    for c in t.columns:
        if c.endswith("_std"):
            continue
        if f"{c}_std" in t.columns:
            out[c] = [_fmt(m, 4) + ("" if not np.isfinite(s) else f" ± {s:.4f}") for m, s in zip(t[c], t[f"{c}_std"])]
        elif c == "rank":
            out[c] = [_fmt(None if not np.isfinite(r) else int(r)) for r in t[c]]
        else:
            out[c] = [_fmt(v, 1 if "per_sec" in c or "mem" in c else 4 if c == "gflops" else 3) for v in t[c]]
    return out


def _markdown_table(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


FORMULA = ("z = (m - mean over backbones) / std over backbones, per setting (task type x dataset x mode x "
           "metric) on the seed-averaged metric m; task score = mean z over the task's settings; score = mean of task "
           "scores. Ranked: backbones covering every setting.")


def to_markdown(board: Leaderboard) -> str:
    parts = ["# Leaderboard", "", FORMULA, "", _markdown_table(display_table(board))]
    if len(board.missing):
        parts += ["", "## Missing cells (not scored)", "", _markdown_table(board.missing)]
    if len(board.failed):
        parts += ["", "## Failed cells (not scored)", "", _markdown_table(board.failed.drop(columns="run_dir"))]
    return "\n".join(parts) + "\n"


def plot_pareto(board: Leaderboard, path: Path) -> Path:
    """Overall score against inference throughput (or GFLOPs), Pareto front marked."""
    import matplotlib.pyplot as plt

    t, axis = board.table, board.efficiency_axis
    fig, ax = plt.subplots(figsize=(7, 5))
    for family, g in t.groupby("family"):
        ax.scatter(g[axis], g["score"], label=family, s=40)
    for x, y, name in zip(t[axis], t["score"], t["backbone"]):
        ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = t[t["pareto"]].sort_values(axis)
    ax.plot(front[axis], front["score"], "k--", lw=1)
    ax.scatter(front[axis], front["score"], s=150, facecolors="none", edgecolors="k", label="Pareto front")
    ax.set_xlabel("inference throughput (img/s)" if axis == "infer_samples_per_sec" else "GFLOPs per image (lower is better)")
    ax.set_ylabel("overall score (mean z)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_tasks(board: Leaderboard, path: Path) -> Path:
    """Per-task score bars, one group per backbone."""
    import matplotlib.pyplot as plt

    t = board.table
    cols = [c for c in t.columns if c.startswith("score_")]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(t)), 4.5))
    width = 0.8 / max(1, len(cols))
    xs = np.arange(len(t))
    for i, c in enumerate(cols):
        ax.bar(xs + i * width, t[c].fillna(0), width, label=c[len("score_"):])
    ax.set_xticks(xs + width * (len(cols) - 1) / 2, t["backbone"], rotation=30, ha="right", fontsize=8)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("task score (mean z)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_scaling(bench: pd.DataFrame, path: Path) -> Path:
    """Inference throughput and peak memory against resolution, one line per backbone, coloured by family."""
    import matplotlib.pyplot as plt

    ok = _measured(bench)
    families = sorted(ok["family"].dropna().unique())
    colours = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, g in ok.sort_values("infer_img_size").groupby("model"):
        c = colours.get(g["family"].iloc[0])
        axes[0].plot(g["infer_img_size"], g["infer_samples_per_sec"], "o-", color=c, label=name)
        axes[1].plot(g["infer_img_size"], g["infer_peak_mem_mb"], "o-", color=c, label=name)
    for ax, label in zip(axes, ("inference throughput (img/s)", "inference peak memory (MiB)")):
        ax.set_xlabel("resolution (px)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("colour = family: " + ", ".join(families), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>backbone-arena leaderboard</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f0f0f0; cursor: pointer; user-select: none; }}
td:nth-child(2), td:nth-child(3), td:nth-child(4) {{ text-align: left; }}
tr.pareto td:nth-child(2) {{ font-weight: bold; }}
img {{ max-width: 48%; margin: 1em 1% 0 0; }}
</style></head><body>
<h1>backbone-arena leaderboard</h1>
<p>{formula}</p>
<p><label>family <select id="family"><option value="">all</option>{options}</select></label>
(click a column header to sort; bold: on the Pareto front)</p>
<table id="board"><thead><tr>{head}</tr></thead><tbody>
{rows}
</tbody></table>
{extra}
<script>
const table = document.getElementById("board");
const body = table.tBodies[0];
document.getElementById("family").addEventListener("change", e => {{
  for (const tr of body.rows) tr.style.display = !e.target.value || tr.dataset.family === e.target.value ? "" : "none";
}});
table.tHead.querySelectorAll("th").forEach((th, col) => th.addEventListener("click", () => {{
  const asc = th.dataset.asc !== "1";
  th.dataset.asc = asc ? "1" : "0";
  const key = tr => {{ const v = tr.cells[col].dataset.v; const n = parseFloat(v); return isNaN(n) ? v : n; }};
  const rows = Array.from(body.rows).sort((a, b) => {{
    const x = key(a), y = key(b);
    if (x === "" || y === "") return x === "" ? 1 : -1;
    return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
  }});
  rows.forEach(r => body.appendChild(r));
}}));
</script></body></html>
"""


def _sort_value(v: Any) -> str:
    if v is None or v is pd.NA or (isinstance(v, (float, np.floating)) and not np.isfinite(v)):
        return ""
    return str(int(v)) if isinstance(v, (bool, np.bool_)) else str(v)


def to_html(board: Leaderboard, images: Sequence[Path] = ()) -> str:
    """One self-contained page: sortable table, family filter, plots inlined as data URIs."""
    shown = display_table(board)
    raw = board.table
    head = "".join(f"<th>{html.escape(c)}</th>" for c in shown.columns)
    rows = []
    for i in shown.index:
        cells = "".join(f'<td data-v="{html.escape(_sort_value(raw.loc[i, c]))}">{html.escape(shown.loc[i, c])}</td>'
                        for c in shown.columns)
        cls = ' class="pareto"' if raw.loc[i, "pareto"] else ""
        rows.append(f'<tr data-family="{html.escape(str(raw.loc[i, "family"]))}"{cls}>{cells}</tr>')
    options = "".join(f'<option value="{html.escape(f)}">{html.escape(f)}</option>'
                      for f in sorted(raw["family"].dropna().unique()))
    extra = []
    for title, df in (("Missing cells (not scored)", board.missing), ("Failed cells (not scored)", board.failed)):
        if len(df):
            extra.append(f"<h2>{title}</h2>" + df.drop(columns="run_dir", errors="ignore").to_html(index=False))
    for img in images:
        data = base64.b64encode(Path(img).read_bytes()).decode()
        extra.append(f'<img alt="{html.escape(Path(img).stem)}" src="data:image/png;base64,{data}">')
    return _HTML.format(formula=html.escape(FORMULA), options=options, head=head, rows="\n".join(rows),
                        extra="\n".join(extra))


def write_leaderboard(board: Leaderboard, out_dir: str | Path) -> list[Path]:
    """Write leaderboard.csv/.md/.html, cells.csv and the PNG plots into ``out_dir``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_pareto(board, out / "pareto.png"), plot_tasks(board, out / "tasks.png")]
    if board.bench is not None and len(board.bench):
        paths.append(plot_scaling(board.bench, out / "scaling.png"))
    board.table.to_csv(out / "leaderboard.csv", index=False)
    board.cells.to_csv(out / "cells.csv", index=False)
    (out / "leaderboard.md").write_text(to_markdown(board))
    (out / "leaderboard.html").write_text(to_html(board, paths))
    return [out / "leaderboard.csv", out / "cells.csv", out / "leaderboard.md", out / "leaderboard.html", *paths]


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{str(root)!r} is not a directory; pass a battle or runs directory")
    bench = pd.concat([pd.read_csv(p) for p in args.bench]) if args.bench else None
    board = build_leaderboard(find_records(root), bench)
    for path in write_leaderboard(board, args.out or root / "leaderboard"):
        print(f"wrote {path}")
    print(display_table(board)[["rank", "backbone", "family", "coverage", "score"]].to_string(index=False))
    if len(board.failed):
        print(json.dumps(board.failed[["backbone", "task", "seed", "error"]].to_dict("records"), indent=1))
    return 0


def add_leaderboard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("leaderboard", help="aggregate run records BoB-style into csv, md, html and png")
    p.add_argument("dir", help="directory searched recursively for metrics.json records")
    p.add_argument("--out", help="output directory (default: DIR/leaderboard)")
    p.add_argument("--bench", nargs="+", default=[], help="`arena bench` CSVs for throughput and memory columns")
    p.set_defaults(func=_cmd_leaderboard)
