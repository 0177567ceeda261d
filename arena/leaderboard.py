"""Leaderboards from run records: BoB-style z-score aggregation, ranks, and publication.

    arena leaderboard outputs/battles/default [--out DIR] [--bench bench.csv ...]
    arena leaderboard DIR --group pretraining --filter family=hybrid --filter family=baseline

Rows are *entries*: an architecture with its weights (the record's ``entry``; ``backbone`` for records
that predate it). Aggregation (Battle of the Backbones, Goldblum et al. 2023). A *setting* s is a
task type x dataset x mode x metric; one record can score several (``record_settings``): its task's
primary metric, mask AP beside box AP for detection, and each OOD test set as a setting of task
type ``ood``. The task types are BoB's five: classification (fine-tune, linear probe, kNN),
detection, segmentation, retrieval and ood. For entry b with seeds k = 1..n_bs, m_bs = mean_k
metric_bsk. Across the entries B_s present in s: z_bs = (m_bs - mean_{b' in B_s} m_b's) /
std_{b' in B_s} m_b's (population std; z = 0 when all entries tie). The task score is the mean of
z_bs over the task type's settings the entry has, and the overall score the mean of task scores
over the task types it has. An entry that lacks a setting is never filled in: its ``coverage``
column says how many settings it has, it gets no rank (ranks are among full-coverage entries only)
and the missing cells are listed. Failed cells are listed with their error and not scored; records
that cannot be read are listed with the reason.

Only ``metrics.json`` records are read; for one entry x setting x seed the newest record counts.
Efficiency columns come from the records (params, multiply-accumulates) and from ``arena bench``
CSVs (throughput and peak memory at the records' resolution): ``DIR/bench.csv`` when present,
the ``--bench`` files when given.
"""
from __future__ import annotations

import argparse
import base64
import html
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from .records import scan_records

KEY = "entry"  # a leaderboard row: an architecture with its weights
SETTING = ["task", "dataset", "mode", "metric"]
# (upper bound in parameters, label) of the size tiers, by backbone parameters
SIZE_TIERS = ((10e6, "<10M"), (30e6, "10-30M"), (90e6, "30-90M"), (math.inf, ">=90M"))
FLOPS_PER_MAC = 2  # a record's ``flops`` counts a multiply-add as two operations (arena.bench.count_flops)
FILTER_KEYS = ("family", "pretraining", "architecture", "weights")


def size_tier(params: float) -> str:
    if not np.isfinite(params):
        return "?"
    return next(label for bound, label in SIZE_TIERS if params < bound)


def setting_name(task: str, dataset: str, mode: str, metric: str) -> str:
    return f"{task}/{dataset}/{mode}:{metric}"


@dataclass
class Leaderboard:
    """``table``: one row per entry; ``cells``: one row per entry x setting (mean, std, seeds, z);
    ``missing``: entry x setting pairs without a complete record; ``failed``: failed records;
    ``unreadable``: records that could not be read (path, reason); ``bench``: the ``arena bench`` rows
    given, if any (all resolutions: the scaling plot)."""

    table: pd.DataFrame
    cells: pd.DataFrame
    missing: pd.DataFrame
    failed: pd.DataFrame
    unreadable: pd.DataFrame
    bench: pd.DataFrame | None
    efficiency_axis: str  # the x axis of the Pareto front: infer_samples_per_sec or gmacs
    bench_used: pd.DataFrame | None = None  # the bench rows in the table: each entry's at its records' resolution


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
    """One row per setting a record scores (``record_settings``), its value as ``value``.

    Records written before entries existed get the defaults: weights "random", pretraining "none",
    entry = backbone.
    """
    rows = []
    for r in records:
        for task, dataset, metric, value in record_settings(r):
            rows.append({
                KEY: r.get("entry") or r["backbone"], "architecture": r["backbone"],
                "weights": r.get("weights") or "random",
                "pretraining": r.get("pretraining") or "none", "family": r["family"], "task": task,
                "dataset": dataset, "mode": r["mode"], "seed": int(r["seed"]), "status": r["status"],
                "metric": metric, "value": value, "params": r.get("params"),
                "flops": r.get("flops"), "image_size": r.get("image_size"), "created": r.get("created", ""),
                "error": r.get("error"), "run_dir": r.get("run_dir"),
            })
    cols = [KEY, "architecture", "weights", "pretraining", "family", "task", "dataset", "mode", "seed", "status",
            "metric", "value", "params", "flops", "image_size", "created", "error", "run_dir"]
    df = pd.DataFrame(rows, columns=cols)
    for c in ("value", "params", "flops", "image_size"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def parse_filters(items: Sequence[str]) -> dict[str, list[str]]:
    """``["pretraining=none", "family=hybrid", "family=baseline"]`` -> ``{key: [values]}``; a key's values
    are alternatives."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in FILTER_KEYS or not value:
            raise ValueError(f"filter {item!r} is not KEY=VALUE with KEY one of {FILTER_KEYS}; "
                             f"e.g. --filter pretraining=none")
        out.setdefault(key, []).append(value)
    return out


def zscores(means: pd.Series) -> pd.Series:
    """z-scores of one setting's per-entry means (population std; all zero when they tie)."""
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


BENCH_COLUMNS = ["infer_samples_per_sec", "infer_peak_mem_mb", "train_samples_per_sec", "train_peak_mem_mb"]


def _bench_rows(bench: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """The bench row of each entry's architecture at its records' resolution, indexed like ``table`` (absent when
    not benchmarked there): the weights do not change the speed."""
    ok = _measured(bench)
    rows = {}
    for i, name, size in zip(table.index, table["architecture"], table["image_size"]):
        match = ok[(ok["model"] == name) & (ok["infer_img_size"] == size)]
        if len(match):
            rows[i] = match.iloc[-1]
    return pd.DataFrame.from_dict(rows, orient="index", columns=ok.columns)


def build_leaderboard(records: Iterable[dict[str, Any]], bench: pd.DataFrame | None = None, *,
                      unreadable: Sequence[tuple[str, str]] = (),
                      where: dict[str, list[str]] | None = None) -> Leaderboard:
    """Aggregate run records into the leaderboard (see the module docstring for the formula).

    ``unreadable``: (path, reason) of records that could not be read, listed in every output.
    ``where``: keep only records whose ``FILTER_KEYS`` fields take one of the given values (before scoring:
    the z-scores compare the kept entries among themselves).
    """
    df = records_frame(records)
    for col, values in (where or {}).items():
        df = df[df[col].isin(values)]
    if df.empty:
        raise ValueError("no run records to aggregate" + (" after filtering" if where else "") +
                         "; point the leaderboard at a directory holding metrics.json files")
    key = [KEY, *SETTING, "seed"]
    df = df.sort_values("created").drop_duplicates(key + ["status"], keep="last")
    done = df[df["status"] == "complete"]
    no_metric = done[done["value"].isna()]
    done = done[done["value"].notna()]
    failed = df[df["status"] == "failed"]
    failed = failed[~failed.set_index(key).index.isin(done.set_index(key).index)]
    no_metric = no_metric.assign(error=lambda d: "primary metric " + d["metric"] + " missing from the record")
    failed = pd.concat([failed, no_metric])[key + ["error", "run_dir"]].reset_index(drop=True)

    cells = (done.groupby([KEY, *SETTING])
             .agg(mean=("value", "mean"), std=("value", "std"), seeds=("seed", "nunique"))
             .reset_index())
    cells["z"] = cells.groupby(SETTING)["mean"].transform(zscores)
    settings = cells[SETTING].drop_duplicates().sort_values(SETTING)
    tasks = sorted(settings["task"].unique())

    everyone = pd.concat([done, failed.assign(status="failed")])[KEY].unique()
    grid = pd.MultiIndex.from_product([sorted(everyone), [tuple(s) for s in settings.itertuples(index=False)]])
    have = set(zip(cells[KEY], zip(*(cells[c] for c in SETTING))))
    missing = pd.DataFrame([(b, *s) for b, s in grid if (b, s) not in have], columns=[KEY, *SETTING])

    per_task = cells.groupby([KEY, "task"])["z"].mean().unstack("task").reindex(columns=tasks)
    info = df.groupby(KEY).agg(architecture=("architecture", "first"), family=("family", "first"),
                               pretraining=("pretraining", "first"), weights=("weights", "first"),
                               params=("params", "median"), flops=("flops", "median"),
                               image_size=("image_size", "median"))
    table = info.reindex(sorted(everyone)).rename_axis(KEY).reset_index()
    table["size"] = table["params"].map(size_tier)
    table["params_m"] = (table["params"] / 1e6).round(3)
    table["gmacs"] = (table["flops"] / (FLOPS_PER_MAC * 1e9)).round(4)
    n_settings = cells.groupby(KEY).size()
    table["coverage"] = [f"{int(n_settings.get(b, 0))}/{len(settings)}" for b in table[KEY]]
    full = table[KEY].map(lambda b: n_settings.get(b, 0) == len(settings))
    table["score"] = table[KEY].map(per_task.mean(axis=1)).astype(float)
    table["rank"] = table["score"].where(full).rank(ascending=False, method="min")
    for task in tasks:
        table[f"score_{task}"] = table[KEY].map(per_task[task]).astype(float)
    for s in settings.itertuples(index=False):
        sel = cells[(cells[SETTING] == tuple(s)).all(axis=1)]
        name = setting_name(*s)
        by = sel.set_index(KEY)
        table[name] = table[KEY].map(by["mean"])
        table[f"{name}_std"] = table[KEY].map(by["std"])
    table["seeds"] = table[KEY].map(cells.groupby(KEY)["seeds"].min()).astype("Int64")

    axis, used = "gmacs", None
    if bench is not None and len(bench):
        used = _bench_rows(bench, table)
        table = table.join(used.reindex(index=table.index, columns=BENCH_COLUMNS).astype(float))
        if table["infer_samples_per_sec"].notna().any():
            axis = "infer_samples_per_sec"
    table["pareto"] = pareto_front(table[axis], table["score"], x_higher_better=axis != "gmacs")
    table = table.sort_values(["rank", "score"], ascending=[True, False], na_position="last").reset_index(drop=True)
    front = ["rank", KEY, "architecture", "family", "pretraining", "weights", "size", "params_m", "gmacs",
             "coverage", "score"]
    table = table[front + [c for c in table.columns if c not in front + ["params", "flops", "image_size"]]]
    bad = pd.DataFrame(list(unreadable), columns=["path", "reason"])
    return Leaderboard(table, cells, missing, failed, bad, bench, axis, used)


def group_summary(board: Leaderboard, by: str) -> pd.DataFrame:
    """Entries grouped by ``by`` (family or pretraining): how many, how many ranked, mean score, the best one."""
    t = board.table.dropna(subset=["score"])
    best = t.loc[t.groupby(by)["score"].idxmax(), [by, KEY, "score"]].set_index(by)
    out = t.groupby(by).agg(entries=(KEY, "size"), ranked=("rank", "count"), mean_score=("score", "mean"))
    out = out.join(best.rename(columns={KEY: "best", "score": "best_score"}))
    return out.sort_values("mean_score", ascending=False).reset_index()


# --- rendering -------------------------------------------------------------------------------------------

FORMULA = ("z = (m - mean over entries) / std over entries, per setting (task type x dataset x mode x metric) "
           "on the seed-averaged metric m; task score = mean z over the task type's settings; score = mean of task "
           "scores. Ranked: entries covering every setting.")
HEADERS = {"rank": "rank", KEY: "entry", "params_m": "params (M)", "gmacs": "GMACs", "score": "score (z)",
           "infer_samples_per_sec": "inference (img/s)", "infer_peak_mem_mb": "inference peak memory (MiB)",
           "train_samples_per_sec": "training (img/s)", "train_peak_mem_mb": "training peak memory (MiB)",
           "pareto": "Pareto front"}
# columns where a smaller value is better (first click sorts ascending); other numeric columns sort descending
LOWER_IS_BETTER = {"rank", "size", "params_m", "gmacs", "infer_peak_mem_mb", "train_peak_mem_mb"}
NUMERIC_TEXT = {"size", "coverage"}  # shown as text, sorted by a number


def header(column: str) -> str:
    """The readable header of a table column, with its unit."""
    if column in HEADERS:
        return HEADERS[column]
    if column.startswith("score_"):
        return f"{column[len('score_'):]} score (z)"
    if ":" in column:  # a setting: task/dataset/mode:metric
        setting, metric = column.rsplit(":", 1)
        return f"{' · '.join(setting.split('/'))} ({metric})"
    return column.replace("_", " ")


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
            out[c] = [_fmt(v, 1 if "per_sec" in c or "mem" in c else 4 if c == "gmacs" else 3) for v in t[c]]
    return out


def bench_settings_line(board: Leaderboard) -> str:
    """Where the throughput and memory columns come from: the ``arena bench`` rows in the table, their resolution,
    batch, device, threads, clock, precision and the form inference was timed in (deploy: reparameterized)."""
    ok = board.bench_used
    if ok is None or not len(ok):
        return "No arena bench measurements: no throughput or memory columns."
    parts = []
    for col, label in (("infer_img_size", "resolution (px)"), ("infer_batch_size", "batch"), ("device", "device"),
                       ("threads", "threads"), ("clock", "clock"), ("precision", "precision")):
        if col in ok and ok[col].notna().any():
            values = {int(v) if isinstance(v, float) and v.is_integer() else v for v in ok[col].dropna()}
            parts.append(f"{label} {', '.join(str(v) for v in sorted(values, key=lambda v: (isinstance(v, str), v)))}")
    if "infer_form" in ok and ok["infer_form"].notna().any():
        forms = ok.dropna(subset=["infer_form"]).groupby("infer_form")["model"].agg(lambda m: ", ".join(sorted(set(m))))
        parts.append("inference form " + ", ".join(f"{form} ({models})" for form, models in forms.items()))
    return "Throughput and memory measured by arena bench: " + "; ".join(parts) + "."


def csv_safe(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with text cells that a spreadsheet would run as a formula (starting with =, +, -, @, tab or CR)
    prefixed with a single quote (OWASP); numbers stay numbers."""
    def cell(v: Any) -> Any:
        return "'" + v if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r") else v

    return df.apply(lambda col: col if pd.api.types.is_numeric_dtype(col) else col.map(cell))


def _md_cell(v: Any) -> str:
    """A markdown table cell: HTML escaped, ``|`` escaped, on one line."""
    return html.escape(" ".join(str(v).split())).replace("|", "\\|")


def _markdown_table(df: pd.DataFrame, headers: Sequence[str] | None = None) -> str:
    names = list(headers) if headers is not None else list(df.columns)
    lines = ["| " + " | ".join(_md_cell(h) for h in names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _sections(board: Leaderboard, group: str | None) -> list[tuple[str, pd.DataFrame]]:
    """The tables shown under the leaderboard: grouping, missing, failed and unreadable records."""
    out = []
    if group:
        out.append((f"By {group}", group_summary(board, group)))
    out += [("Missing cells (not scored)", board.missing),
            ("Failed cells (not scored)", board.failed.drop(columns="run_dir", errors="ignore")),
            ("Unreadable records (not scored)", board.unreadable)]
    return [(title, df) for title, df in out if len(df)]


def to_markdown(board: Leaderboard, group: str | None = None) -> str:
    shown = display_table(board)
    parts = ["# Leaderboard", "", FORMULA, "", bench_settings_line(board), "",
             _markdown_table(shown, [header(c) for c in shown.columns])]
    for title, df in _sections(board, group):
        parts += ["", f"## {title}", "", _markdown_table(df.map(_fmt))]
    return "\n".join(parts) + "\n"


def _mathtext_safe(text: Any) -> str:
    """A plot label shown as written: ``$`` would start matplotlib's mathtext."""
    return str(text).replace("$", r"\$")


def family_colours(families: Iterable[str]) -> dict[str, Any]:
    """One colour per family, the same in every plot."""
    import matplotlib.pyplot as plt

    return {f: plt.cm.tab10(i % 10) for i, f in enumerate(sorted(set(families)))}


def plot_pareto(board: Leaderboard, path: Path) -> Path:
    """Overall score against inference throughput (or GMACs), Pareto front marked, one colour per family."""
    import matplotlib.pyplot as plt

    t, axis = board.table, board.efficiency_axis
    colours = family_colours(t["family"])
    fig, ax = plt.subplots(figsize=(7, 5))
    for family, g in t.groupby("family"):
        ax.scatter(g[axis], g["score"], label=_mathtext_safe(family), s=40, color=colours[family])
    for x, y, name in zip(t[axis], t["score"], t[KEY]):
        ax.annotate(_mathtext_safe(name), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = t[t["pareto"]].sort_values(axis)
    ax.plot(front[axis], front["score"], "k--", lw=1)
    ax.scatter(front[axis], front["score"], s=150, facecolors="none", edgecolors="k", label="Pareto front")
    ax.set_xlabel("inference throughput (img/s)" if axis == "infer_samples_per_sec"
                  else "GMACs per image (lower is better)")
    ax.set_ylabel("overall score (mean z)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_tasks(board: Leaderboard, path: Path) -> Path:
    """Per-task score bars, one group per entry; a task an entry lacks is drawn as a grey x, not as a bar.
    Entry names are coloured by family."""
    import matplotlib.pyplot as plt

    t = board.table
    cols = [c for c in t.columns if c.startswith("score_")]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(t)), 4.5))
    width = 0.8 / max(1, len(cols))
    xs = np.arange(len(t))
    lacking = []
    for i, c in enumerate(cols):
        have = t[c].notna().to_numpy()
        ax.bar(xs[have] + i * width, t[c][have], width, label=_mathtext_safe(c[len("score_"):]))
        lacking += list(xs[~have] + i * width)
    if lacking:
        ax.scatter(lacking, np.zeros(len(lacking)), marker="x", color="0.5", zorder=3, label="missing (not scored)")
    ax.set_xticks(xs + width * (len(cols) - 1) / 2, [_mathtext_safe(n) for n in t[KEY]], rotation=30, ha="right",
                  fontsize=8)
    colours = family_colours(t["family"])
    for tick, family in zip(ax.get_xticklabels(), t["family"]):
        tick.set_color(colours[family])
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("task score (mean z)")
    ax.set_title("entry names coloured by family: " + ", ".join(_mathtext_safe(f) for f in colours), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_scaling(bench: pd.DataFrame, path: Path) -> Path:
    """Inference throughput and peak memory against resolution, one named line per backbone, one colour and
    one legend entry per family."""
    import matplotlib.pyplot as plt

    ok = _measured(bench)
    colours = family_colours(ok["family"].dropna())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, g in ok.sort_values("infer_img_size").groupby("model"):
        family = g["family"].iloc[0]
        c = colours.get(family)
        for ax, col in zip(axes, ("infer_samples_per_sec", "infer_peak_mem_mb")):
            ax.plot(g["infer_img_size"], g[col], "o-", color=c)
            ax.annotate(_mathtext_safe(name), (g["infer_img_size"].iloc[-1], g[col].iloc[-1]), fontsize=7,
                        xytext=(3, 0), textcoords="offset points", color=c)
    for ax, label in zip(axes, ("inference throughput (img/s)", "inference peak memory (MiB)")):
        ax.set_xlabel("resolution (px)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="o", label=_mathtext_safe(f)) for f, c in colours.items()]
    axes[1].legend(handles=handles, fontsize=7, title="family", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>backbone-arena leaderboard</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
.scroll {{ overflow-x: auto; max-width: 100%; }}
table {{ border-collapse: separate; border-spacing: 0; font-size: 13px; }}
th, td {{ border-right: 1px solid #ddd; border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: right;
  white-space: nowrap; }}
th {{ background: #f0f0f0; cursor: pointer; user-select: none; white-space: normal; min-width: 5em;
  max-width: 9em; vertical-align: bottom; position: sticky; top: 0; }}
th .arrow {{ color: #06c; }}
td.text {{ text-align: left; }}
.sticky {{ position: sticky; left: 0; z-index: 1; background: #fff; text-align: left; font-weight: 600;
  border-right: 2px solid #999; }}
th.sticky {{ background: #e6e6e6; z-index: 2; }}
tr.pareto td.sticky::after {{ content: " ★"; color: #c80; }}
.settings {{ color: #555; }}
img {{ max-width: 48%; margin: 1em 1% 0 0; }}
</style></head><body>
<h1>backbone-arena leaderboard</h1>
<p>{formula}</p>
<p class="settings">{settings}</p>
<p>{selects}
(click a header to sort, best first; click again to reverse; ★ on the Pareto front)</p>
<div class="scroll"><table id="board"><thead><tr>{head}</tr></thead><tbody>
{rows}
</tbody></table></div>
{extra}
<script>
const table = document.getElementById("board");
const body = table.tBodies[0];
const heads = Array.from(table.tHead.rows[0].cells);
document.querySelectorAll("select[data-col]").forEach(sel => sel.addEventListener("change", () => {{
  const picks = Array.from(document.querySelectorAll("select[data-col]")).map(s => [s.dataset.col, s.value]);
  for (const tr of body.rows) tr.style.display = picks.every(([k, v]) => !v || tr.dataset[k] === v) ? "" : "none";
}}));
heads.forEach((th, col) => th.addEventListener("click", () => {{
  const dir = th.dataset.dir ? -Number(th.dataset.dir) : (th.dataset.best === "desc" ? -1 : 1);
  heads.forEach(h => {{ delete h.dataset.dir; h.querySelector(".arrow").textContent = ""; }});
  th.dataset.dir = dir;
  th.querySelector(".arrow").textContent = dir > 0 ? " \u25b2" : " \u25bc";
  const numeric = th.dataset.kind === "num";
  const rows = Array.from(body.rows).sort((a, b) => {{
    const x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
    if (x === "" || y === "") return (x === "") - (y === "");  // missing values last either way
    return (numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y)) * dir;
  }});
  rows.forEach(r => body.appendChild(r));
}}));
</script></body></html>
"""


def sort_key(column: str, value: Any) -> str:
    """The ``data-v`` a cell sorts by: numbers as numbers (a size tier by its upper bound in M, coverage by its
    count), text as text, missing as empty (always last)."""
    if value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and not np.isfinite(value)):
        return ""
    if column == "size":
        bounds = {label: bound for bound, label in SIZE_TIERS}
        return "" if value not in bounds else "Infinity" if math.isinf(bounds[value]) else f"{bounds[value] / 1e6:g}"
    if column == "coverage":
        return str(value).split("/")[0]
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    return str(value)


def column_kind(column: str, values: pd.Series) -> str:
    """``num`` when the column sorts by number, else ``text``."""
    return "num" if column in NUMERIC_TEXT or pd.api.types.is_numeric_dtype(values) else "text"


def to_html(board: Leaderboard, images: Sequence[Path] = (), group: str | None = None) -> str:
    """One self-contained page: sortable table (best first), sticky entry column, filters by family and
    pretraining, the bench settings, and the plots inlined as data URIs."""
    shown = display_table(board)
    raw = board.table
    kinds = {c: column_kind(c, raw[c]) for c in shown.columns}
    head = "".join(
        f'<th data-kind="{kinds[c]}" data-best="{"asc" if c in LOWER_IS_BETTER or kinds[c] == "text" else "desc"}"'
        f'{" class=sticky" if c == KEY else ""}>{html.escape(header(c))}<span class="arrow"></span></th>'
        for c in shown.columns)
    rows = []
    for i in shown.index:
        cells = "".join(
            f'<td data-v="{html.escape(sort_key(c, raw.loc[i, c]))}"'
            f'{" class=sticky" if c == KEY else " class=text" if kinds[c] == "text" else ""}>'
            f"{html.escape(shown.loc[i, c])}</td>" for c in shown.columns)
        cls = ' class="pareto"' if raw.loc[i, "pareto"] else ""
        rows.append(f'<tr data-family="{html.escape(str(raw.loc[i, "family"]))}" '
                    f'data-pretraining="{html.escape(str(raw.loc[i, "pretraining"]))}"{cls}>{cells}</tr>')
    selects = " ".join(
        f'<label>{col} <select data-col="{col}"><option value="">all</option>'
        + "".join(f'<option value="{html.escape(v)}">{html.escape(v)}</option>'
                  for v in sorted(raw[col].dropna().unique()))
        + "</select></label>" for col in ("family", "pretraining"))
    extra = [f"<h2>{html.escape(title)}</h2>" + df.map(_fmt).to_html(index=False, escape=True)
             for title, df in _sections(board, group)]
    for img in images:
        data = base64.b64encode(Path(img).read_bytes()).decode()
        extra.append(f'<img alt="{html.escape(Path(img).stem)}" src="data:image/png;base64,{data}">')
    return _HTML.format(formula=html.escape(FORMULA), settings=html.escape(bench_settings_line(board)),
                        selects=selects, head=head, rows="\n".join(rows), extra="\n".join(extra))


def write_leaderboard(board: Leaderboard, out_dir: str | Path, group: str | None = None) -> list[Path]:
    """Write leaderboard.csv/.md/.html, cells.csv, unreadable.csv (and groups.csv with ``group``) and the PNG
    plots into ``out_dir``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_pareto(board, out / "pareto.png"), plot_tasks(board, out / "tasks.png")]
    if board.bench is not None and len(board.bench):
        paths.append(plot_scaling(board.bench, out / "scaling.png"))
    tables = {"leaderboard.csv": board.table, "cells.csv": board.cells, "unreadable.csv": board.unreadable}
    if group:
        tables["groups.csv"] = group_summary(board, group)
    for name, df in tables.items():
        csv_safe(df).to_csv(out / name, index=False)
    (out / "leaderboard.md").write_text(to_markdown(board, group))
    (out / "leaderboard.html").write_text(to_html(board, paths, group))
    return [*(out / n for n in tables), out / "leaderboard.md", out / "leaderboard.html", *paths]


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{str(root)!r} is not a directory; pass a battle or runs directory")
    bench_files = args.bench or ([root / "bench.csv"] if (root / "bench.csv").is_file() else [])
    bench = pd.concat([pd.read_csv(p) for p in bench_files]) if bench_files else None
    scan = scan_records(root)
    for path, reason in scan.unreadable:
        print(f"unreadable record {path}: {reason}", file=sys.stderr)
    try:
        board = build_leaderboard(scan.records, bench, unreadable=scan.unreadable, where=parse_filters(args.filter))
    except ValueError as e:
        print(f"arena leaderboard: {e}", file=sys.stderr)
        return 1
    for path in write_leaderboard(board, args.out or root / "leaderboard", args.group):
        print(f"wrote {path}")
    print(display_table(board)[["rank", KEY, "family", "pretraining", "coverage", "score"]].to_string(index=False))
    for title, df in _sections(board, args.group):
        print(f"\n{title}:\n{df.map(_fmt).to_string(index=False)}")
    return 0


def add_leaderboard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("leaderboard", help="aggregate run records BoB-style into csv, md, html and png")
    p.add_argument("dir", help="directory searched recursively for metrics.json records")
    p.add_argument("--out", help="output directory (default: DIR/leaderboard)")
    p.add_argument("--bench", nargs="+", default=[],
                   help="`arena bench` CSVs for throughput and memory columns (default: DIR/bench.csv when present)")
    p.add_argument("--group", choices=("family", "pretraining"), help="add a table of entries grouped by this column")
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help=f"score only records with KEY (one of {', '.join(FILTER_KEYS)}) = VALUE; repeat to allow "
                        f"several values or keys, e.g. --filter pretraining=none")
    p.set_defaults(func=_cmd_leaderboard)
