"""Leaderboard maths on hand-made records with known answers, and the published files."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from arena.cli import main as cli_main
from arena.leaderboard import (build_leaderboard, csv_safe, pareto_front, parse_filters, sort_key, to_html,
                               write_leaderboard)
from arena.records import RECORD_NAME, find_records, write_json_atomic

Z = math.sqrt(1.5)  # z-scores of three equally spaced means: -sqrt(3/2), 0, +sqrt(3/2)
FAMILY = {"a_net": "hybrid", "b_net": "state-space", "c_net": "baseline", "d_net": "large-kernel",
          "e_net": "multi-axis"}
METRIC = {"classification": "acc1", "segmentation": "miou"}


def rec(backbone: str, task: str, value: float | None, seed: int = 0, *, status: str = "complete",
        created: str = "2026-01-01T00:00:00", params: float = 5e6, flops: float = 1e9) -> dict:
    metric = METRIC[task]
    return {"schema_version": 1, "status": status, "stage": "train", "backbone": backbone, "family": FAMILY[backbone],
            "task": task, "mode": "fine_tune", "head": None, "dataset": "shapes", "seed": seed,
            "config_hash": f"{backbone}{task}{seed}", "primary_metric": metric,
            "metrics": {} if value is None else {metric: value, "loss": 1.0}, "params": params, "flops": flops,
            "image_size": 64, "wall_time_s": 1.0, "versions": {}, "created": created,
            "run_dir": f"/runs/{backbone}/{task}/{seed}", "error": "RuntimeError: boom" if status == "failed" else None}


def battle_records() -> list[dict]:
    """a, b, c on two tasks with means 0.1/0.2/0.3 (cls) and 0.3/0.1/0.2 (seg); d only failed."""
    return [
        rec("a_net", "classification", 0.05, seed=0), rec("a_net", "classification", 0.15, seed=1),
        rec("b_net", "classification", 0.2, params=20e6, flops=2e9),
        rec("c_net", "classification", 0.9, created="2025-01-01T00:00:00"),  # superseded by the newer record
        rec("c_net", "classification", 0.3, created="2026-02-01T00:00:00", params=50e6, flops=0.5e9),
        rec("a_net", "segmentation", 0.3), rec("b_net", "segmentation", 0.1, params=20e6, flops=2e9),
        rec("c_net", "segmentation", 0.2, params=50e6, flops=0.5e9),
        rec("b_net", "segmentation", None, seed=1, status="failed"),
        rec("d_net", "classification", None, status="failed"),
    ]


def test_zscores_task_scores_ranks_and_seeds() -> None:
    board = build_leaderboard(battle_records())
    t = board.table.set_index("entry")
    assert t.loc["a_net", "score_classification"] == pytest.approx(-Z)
    assert t.loc["c_net", "score_classification"] == pytest.approx(Z)
    assert t.loc["a_net", "score_segmentation"] == pytest.approx(Z)
    assert t.loc["b_net", "score_segmentation"] == pytest.approx(-Z)
    assert t.loc[["a_net", "b_net", "c_net"], "score"].tolist() == pytest.approx([0.0, -Z / 2, Z / 2])
    assert t.loc[["c_net", "a_net", "b_net"], "rank"].tolist() == [1, 2, 3]
    assert list(board.table["entry"][:3]) == ["c_net", "a_net", "b_net"]
    col = "classification/shapes/fine_tune:acc1"
    assert t.loc["a_net", col] == pytest.approx(0.1) and t.loc["a_net", f"{col}_std"] == pytest.approx(0.05 * math.sqrt(2))
    cells = board.cells.set_index(["entry", "task"])
    assert cells.loc[("a_net", "classification"), "seeds"] == 2 and cells.loc[("a_net", "segmentation"), "seeds"] == 1
    assert t.loc["a_net", "seeds"] == 1  # the table shows the fewest seeds over its settings
    assert t.loc["c_net", col] == pytest.approx(0.3)  # the newer record of the same cell counts
    assert t.loc[["a_net", "b_net", "c_net"], "size"].tolist() == ["<10M", "10-30M", "30-90M"]
    assert t.loc["c_net", "gmacs"] == pytest.approx(0.25)


def test_failed_and_missing_cells_are_listed_not_scored() -> None:
    board = build_leaderboard(battle_records())
    t = board.table.set_index("entry")
    failed = set(zip(board.failed["entry"], board.failed["task"], board.failed["seed"]))
    assert failed == {("b_net", "segmentation", 1), ("d_net", "classification", 0)}
    assert (board.failed["error"] == "RuntimeError: boom").all()
    assert t.loc["d_net", "coverage"] == "0/2" and np.isnan(t.loc["d_net", "score"]) and np.isnan(t.loc["d_net", "rank"])
    assert set(board.missing["entry"]) == {"d_net"} and len(board.missing) == 2


def test_partial_coverage_keeps_its_score_but_gets_no_rank() -> None:
    records = [rec("a_net", "classification", 0.1), rec("b_net", "classification", 0.3), rec("e_net", "classification", 0.2),
               rec("a_net", "segmentation", 0.2), rec("b_net", "segmentation", 0.1)]
    t = build_leaderboard(records).table.set_index("entry")
    assert t.loc["e_net", "coverage"] == "1/2" and np.isnan(t.loc["e_net", "rank"])
    assert t.loc["e_net", "score"] == pytest.approx(0.0)  # its one task, not averaged with a made-up value
    assert t.loc["b_net", "score"] == pytest.approx((Z + -1.0) / 2)  # seg: two backbones -> z = +-1
    assert t.loc[["a_net", "b_net"], "rank"].tolist() == [2, 1]


def test_pareto_front() -> None:
    x = pd.Series([100.0, 50.0, 80.0, np.nan])
    y = pd.Series([0.0, -1.0, 1.0, 5.0])
    assert pareto_front(x, y).tolist() == [True, False, True, False]
    assert pareto_front(x, y, x_higher_better=False).tolist() == [False, True, True, False]
    bench = pd.DataFrame({"model": ["a_net", "b_net", "c_net", "c_net"], "infer_img_size": [64, 64, 64, 128],
                          "infer_samples_per_sec": [100.0, 50.0, 80.0, 10.0], "infer_peak_mem_mb": [1.0, 2.0, 3.0, 9.0],
                          "family": ["hybrid", "state-space", "baseline", "baseline"], "error": [None] * 4})
    board = build_leaderboard(battle_records(), bench)
    t = board.table.set_index("entry")
    assert board.efficiency_axis == "infer_samples_per_sec"
    assert t.loc["c_net", "infer_samples_per_sec"] == 80.0  # the bench row at the records' resolution
    assert t["pareto"].to_dict() == {"c_net": True, "a_net": True, "b_net": False, "d_net": False}
    without = build_leaderboard(battle_records()).table.set_index("entry")  # GMACs axis: lower is better
    assert without["pareto"].to_dict() == {"c_net": True, "a_net": False, "b_net": False, "d_net": False}


def test_published_files_reproduce_from_records_on_disk(tmp_path: Path) -> None:
    for i, r in enumerate(battle_records()):
        write_json_atomic(tmp_path / "runs" / str(i) / RECORD_NAME, r)
    bench = tmp_path / "bench.csv"
    pd.DataFrame({"model": ["a_net", "a_net", "c_net", "c_net"], "family": ["hybrid", "hybrid", "baseline", "baseline"],
                  "infer_img_size": [64, 128, 64, 128], "infer_samples_per_sec": [100.0, 30.0, 80.0, 20.0],
                  "infer_peak_mem_mb": [1.0, 4.0, 3.0, 12.0], "error": [None] * 4}).to_csv(bench, index=False)
    out = tmp_path / "board"
    assert cli_main(["leaderboard", str(tmp_path / "runs"), "--out", str(out), "--bench", str(bench)]) == 0
    for name in ("leaderboard.csv", "leaderboard.md", "leaderboard.html", "pareto.png", "tasks.png", "scaling.png"):
        assert (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = pd.read_csv(out / "leaderboard.csv").set_index("entry")
    memory = build_leaderboard(battle_records(), pd.read_csv(bench)).table.set_index("entry")
    assert csv["score"].tolist() == pytest.approx(memory["score"].tolist(), nan_ok=True)
    assert csv["rank"].tolist() == pytest.approx(memory["rank"].tolist(), nan_ok=True)
    assert len(list(find_records(tmp_path / "runs"))) == len(battle_records())

    page = (out / "leaderboard.html").read_text()
    body = page.split('<table id="board">')[1].split("</table>")[0]
    rows = re.findall(r'<tr data-family="([^"]+)"', body)
    assert sorted(rows) == sorted(FAMILY[b] for b in ("a_net", "b_net", "c_net", "d_net"))  # one row per backbone
    assert "<script>" in page and "http" not in page.split("<body>")[1].split("<img")[0]  # no CDN, nothing fetched
    assert page.count('src="data:image/png;base64,') == 3
    md = (out / "leaderboard.md").read_text()
    assert "| 1 | c_net |" in md and "## Failed cells" in md and "## Missing cells" in md


def test_no_records_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no run records"):
        build_leaderboard(find_records(tmp_path))


def _write_runs(root: Path, records: list) -> None:
    for i, r in enumerate(records):
        d = root / f"run{i}"
        d.mkdir(parents=True)
        (d / RECORD_NAME).write_text(r if isinstance(r, str) else json.dumps(r))


def test_unreadable_records_are_listed_and_the_rest_scored(tmp_path: Path, capsys) -> None:
    good = [rec("a_net", "classification", 0.1), rec("b_net", "classification", 0.3)]
    bad = {"null": "not a JSON object", "42": "not a JSON object", "{\"status\": ": "invalid JSON",
           json.dumps(rec("c_net", "classification", 0.2) | {"status": "done"}): "status 'done' is not one of",
           json.dumps(rec("c_net", "classification", 0.2) | {"metrics": None}): "metrics null is not an object",
           json.dumps(rec("c_net", "classification", 0.2) | {"seed": "zero"}): "seed 'zero' is not an integer"}
    _write_runs(tmp_path / "runs", [*good, *bad])
    pd.DataFrame({"model": ["a_net", "b_net", "a_net"], "family": ["hybrid", "state-space", "hybrid"],
                  "infer_img_size": [64, 64, 128], "infer_batch_size": [8, 8, 8], "device": ["cpu"] * 3,
                  "threads": [2] * 3, "infer_samples_per_sec": [10.0, 20.0, 3.0], "infer_peak_mem_mb": [1.0, 2.0, 4.0],
                  "infer_form": ["deploy", "train", "deploy"],
                  "error": [None] * 3}).to_csv(tmp_path / "runs" / "bench.csv", index=False)
    assert cli_main(["leaderboard", str(tmp_path / "runs")]) == 0
    out = tmp_path / "runs" / "leaderboard"
    board = pd.read_csv(out / "leaderboard.csv").set_index("entry")
    assert list(board.index) == ["b_net", "a_net"] and board.loc["b_net", "score"] == pytest.approx(1.0)
    assert board.loc["b_net", "infer_samples_per_sec"] == 20.0  # DIR/bench.csv used without --bench
    listed = pd.read_csv(out / "unreadable.csv")
    assert len(listed) == len(bad)
    for reason in bad.values():
        assert listed["reason"].str.contains(reason, regex=False).sum() >= 1, reason
    assert all(Path(p).name == RECORD_NAME and Path(p).is_file() for p in listed["path"])
    md, page = (out / "leaderboard.md").read_text(), (out / "leaderboard.html").read_text()
    console = capsys.readouterr()
    for text in (md, page, console.out):
        assert "Unreadable records" in text and "is not an integer" in text
        assert all(p in text for p in listed["path"])
    # the settings of the rows the table uses (the records' 64 px, not the 128 px row), and the timed forms
    assert "resolution (px) 64; batch 8; device cpu; threads 2; inference form deploy (a_net), train (b_net)." in md


def test_no_readable_record_is_a_clear_error_not_a_crash(tmp_path: Path, capsys) -> None:
    _write_runs(tmp_path, ["null", "42"])
    assert cli_main(["leaderboard", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("unreadable record") == 2 and "no run records" in err


def test_entries_are_rows_grouped_and_filtered(tmp_path: Path) -> None:
    in1k = rec("a_net", "classification", 0.5) | {"entry": "a_net.in1k", "weights": "in1k",
                                                  "pretraining": "supervised-in1k"}
    records = [rec("a_net", "classification", 0.1), in1k, rec("b_net", "classification", 0.3)]  # two without entry keys
    t = build_leaderboard(records).table.set_index("entry")
    assert sorted(t.index) == ["a_net", "a_net.in1k", "b_net"]
    assert t.loc["a_net.in1k", ["architecture", "weights", "pretraining"]].tolist() == \
        ["a_net", "in1k", "supervised-in1k"]
    assert t.loc["a_net", ["architecture", "weights", "pretraining"]].tolist() == ["a_net", "random", "none"]
    assert t.loc["a_net.in1k", "rank"] == 1 and t.loc["a_net", "rank"] == 3
    random_only = build_leaderboard(records, where=parse_filters(["pretraining=none"])).table
    assert sorted(random_only["entry"]) == ["a_net", "b_net"]
    assert random_only["score"].tolist() == pytest.approx([1, -1])
    with pytest.raises(ValueError, match="--filter pretraining=none"):
        parse_filters(["pretrain=none"])
    _write_runs(tmp_path / "runs", records)
    assert cli_main(["leaderboard", str(tmp_path / "runs"), "--group", "pretraining"]) == 0
    groups = pd.read_csv(tmp_path / "runs" / "leaderboard" / "groups.csv").set_index("pretraining")
    assert groups.loc["none", "entries"] == 2 and groups.loc["none", "best"] == "b_net"
    assert groups.loc["supervised-in1k", "mean_score"] == pytest.approx(t.loc["a_net.in1k", "score"])
    assert "## By pretraining" in (tmp_path / "runs" / "leaderboard" / "leaderboard.md").read_text()


def test_names_are_escaped_in_csv_markdown_html_and_plots(tmp_path: Path) -> None:
    names = {"=HYPERLINK(\"http://x\")": "hybrid", "+1|<b>bold</b>": "baseline", "$\\notacommand$": "state-space"}
    records = [rec("a_net", "classification", v) | {"entry": n, "backbone": n, "family": f}
               for (n, f), v in zip(names.items(), (0.1, 0.2, 0.3))]
    board = build_leaderboard(records)
    out = tmp_path / "board"
    write_leaderboard(board, out)  # the `$...$` name would make matplotlib's mathtext raise
    csv = pd.read_csv(out / "leaderboard.csv")
    assert set(csv["entry"]) == {"'=HYPERLINK(\"http://x\")", "'+1|<b>bold</b>", "$\\notacommand$"}
    assert (csv["score"] < 0).sum() == 1 and pd.api.types.is_float_dtype(csv["score"])  # -1.22 stays a number
    assert csv_safe(pd.DataFrame({"v": ["-x", "@x", "\tx", "\rx", "ok", -0.5]}))["v"].tolist() == \
        ["'-x", "'@x", "'\tx", "'\rx", "ok", -0.5]
    md = (out / "leaderboard.md").read_text()
    assert "+1\\|&lt;b&gt;bold&lt;/b&gt;" in md and "<b>" not in md
    rows = [line for line in md.splitlines() if "bold" in line]
    assert rows[0].count(" | ") == md.splitlines()[6].count(" | ")  # the | does not add a column
    page = (out / "leaderboard.html").read_text()
    assert "<b>bold" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page


def test_html_sorts_numbers_as_numbers_best_first(tmp_path: Path) -> None:
    assert [sort_key("size", t) for t in ("<10M", "10-30M", "30-90M", ">=90M")] == ["10", "30", "90", "Infinity"]
    assert sort_key("coverage", "12/15") == "12" and sort_key("score", float("nan")) == ""
    records = [rec("a_net", "classification", 0.1, params=95e6), rec("b_net", "classification", 0.3, params=5e6),
               rec("c_net", "classification", 0.2, params=40e6), rec("e_net", "classification", 0.25, params=12e6)]
    page = to_html(build_leaderboard(records))
    heads = re.findall(r'<th data-kind="(\w+)" data-best="(\w+)"( class=sticky)?>([^<]+)<', page)
    kinds = {h[3]: (h[0], h[1], bool(h[2])) for h in heads}
    assert kinds["entry"] == ("text", "asc", True) and kinds["rank"] == ("num", "asc", False)
    assert kinds["score (z)"] == ("num", "desc", False) and kinds["size"] == ("num", "asc", False)
    assert kinds["params (M)"][0] == "num" and kinds["GMACs"] == ("num", "asc", False)
    assert "classification · shapes · fine_tune (acc1)" in kinds
    col = [h[3] for h in heads].index("size")
    body = page.split("<tbody>")[1]
    rows = re.findall(r"<tr [^>]*>(.*?)</tr>", body)
    sizes = [(re.findall(r'<td data-v="([^"]*)"[^>]*>([^<]*)</td>', r)[col]) for r in rows]
    by_key = [label for _, label in sorted(sizes, key=lambda kv: float(kv[0]))]  # the page's numeric sort
    assert by_key == ["&lt;10M", "10-30M", "30-90M", "&gt;=90M"]
