"""Retrieval and kNN probes: metrics against hand-computed values and brute force, and end-to-end runs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from arena.tasks.retrieval import knn_class_scores, retrieval_metrics
from train import train

A, B, C, D = 0, 1, 2, 3


def test_retrieval_metrics_by_hand_with_ties_and_a_query_without_relevant_items() -> None:
    gallery = torch.tensor([[1., 0.], [0., 1.], [1., 0.], [-1., 0.], [0., -1.]])
    gallery_labels = torch.tensor([A, B, B, A, C])
    queries = torch.tensor([[1., 0.], [1., 0.], [0., 1.], [0., -1.]])
    query_labels = torch.tensor([A, B, D, C])  # class D has no gallery item: the third query is left out
    # q0 (A) and q1 (B) tie between g0 (A) and g2 (B): gallery order puts g0 first, so the ranking of both is
    # g0, g2, g1, g4, g3. q0: relevant at ranks 1 and 5 (R=2): AP = (1 + 2/5) / 2, AP@R = 1/2, hit@1.
    # q1: relevant at ranks 2 and 3 (R=2): AP = (1/2 + 2/3) / 2, AP@R = (1/2) / 2, no hit@1, hit@3.
    # q3 (C): g4 first (R=1): AP = AP@R = 1, hit@1.
    m = retrieval_metrics(queries, query_labels, gallery, gallery_labels, ks=(1, 3))
    assert m["num_queries"] == 3 and m["excluded_queries"] == 1
    assert m["map"] == pytest.approx((0.7 + 7 / 12 + 1) / 3)
    assert m["map_at_r"] == pytest.approx((0.5 + 0.25 + 1) / 3)
    assert m["recall_at_1"] == pytest.approx(2 / 3) and m["recall_at_3"] == pytest.approx(1.0)


def test_retrieval_leave_one_out_excludes_the_query_itself() -> None:
    emb = torch.tensor([[1., 0.], [1., 0.], [0., 1.], [1., 0.], [0., -1.]])
    labels = torch.tensor([A, A, B, B, C])  # C is alone: nothing to retrieve once the query itself is out
    # e0, e1: the other A at rank 1 (its own identical copy is excluded) -> AP 1. e2 (B): all similarities 0,
    # gallery order puts e3 third -> AP 1/3, AP@R 0. e3 (B): e0, e1 tie at 1 ahead of e2 -> AP 1/3, AP@R 0.
    m = retrieval_metrics(emb, labels, ks=(1, 3))
    assert m["num_queries"] == 4 and m["excluded_queries"] == 1
    assert m["map"] == pytest.approx(2 / 3) and m["map_at_r"] == pytest.approx(0.5)
    assert m["recall_at_1"] == pytest.approx(0.5) and m["recall_at_3"] == pytest.approx(1.0)


@pytest.mark.parametrize("separate_gallery", [True, False])
def test_retrieval_chunked_equals_unchunked(separate_gallery: bool) -> None:
    g = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(50, 16, generator=g), dim=1)
    labels = torch.randint(0, 5, (50,), generator=g)
    gallery = F.normalize(torch.randn(80, 16, generator=g), dim=1) if separate_gallery else None
    gallery_labels = torch.randint(0, 5, (80,), generator=g) if separate_gallery else None
    whole = retrieval_metrics(queries, labels, gallery, gallery_labels, chunk_size=1000)
    chunked = retrieval_metrics(queries, labels, gallery, gallery_labels, chunk_size=7)
    assert chunked == pytest.approx(whole, abs=1e-6)
    assert 0 < whole["map"] < 1 and whole["num_queries"] == 50


def test_knn_matches_a_brute_force_weighted_vote() -> None:
    g = torch.Generator().manual_seed(1)
    bank = F.normalize(torch.randn(60, 8, generator=g), dim=1)
    bank_labels = torch.randint(0, 4, (60,), generator=g)
    queries = F.normalize(torch.randn(25, 8, generator=g), dim=1)
    scores = knn_class_scores(queries, bank, bank_labels, num_classes=4, k=7, temperature=0.07, chunk_size=6)
    for q, row in zip(queries, scores):
        sims = [float(q @ b) for b in bank]
        nearest = sorted(range(len(bank)), key=lambda i: -sims[i])[:7]
        expected = [0.0] * 4
        for i in nearest:
            expected[int(bank_labels[i])] += torch.tensor(sims[i] / 0.07).exp().item()
        assert row.tolist() == pytest.approx(expected, rel=1e-4)


def test_retrieval_run_on_shapes_tests_without_training(make_cfg, tmp_path: Path) -> None:
    rec = train(make_cfg("backbone=convnext_test", "task=retrieval"), tmp_path)
    assert rec["status"] == "complete" and rec["task"] == "retrieval" and rec["mode"] == "frozen"
    assert rec["primary_metric"] == "map_at_r" and rec["checkpoint"] is None
    m = rec["metrics"]
    assert m["num_queries"] + m["excluded_queries"] == 32
    assert all(0.0 <= m[k] <= 1.0 for k in ("recall_at_1", "recall_at_5", "recall_at_10", "map_at_r", "map"))
    assert m["recall_at_1"] <= m["recall_at_5"] <= m["recall_at_10"]
    assert not (tmp_path / "checkpoints").exists()  # nothing was fitted


def test_knn_run_on_shapes_records_a_classification_probe_with_ood(make_cfg, tmp_path: Path) -> None:
    rec = train(make_cfg("backbone=convnext_test", "task=knn"), tmp_path)
    assert (rec["task"], rec["mode"], rec["primary_metric"]) == ("classification", "knn", "acc1")
    assert set(rec["metrics"]) == {"acc1", "acc5", "ood/sketch/acc1", "ood/sketch/acc5"}
    assert all(0.0 <= v <= 1.0 for v in rec["metrics"].values())


def _colour_folder(root: Path, colours: dict[str, tuple[int, int, int]], per_class: int = 3) -> None:
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            Image.new("RGB", (32, 32), colour).save(root / name / f"{k}.png")


def test_retrieval_query_gallery_folders(make_cfg, tmp_path: Path) -> None:
    """Identical images within a class: every query with its class in the gallery finds it first."""
    root = tmp_path / "data"
    _colour_folder(root / "gallery", {"red": (230, 20, 20), "blue": (20, 20, 230)})
    _colour_folder(root / "query", {"red": (230, 20, 20), "blue": (20, 20, 230), "green": (20, 230, 20)}, 2)
    cfg = make_cfg("backbone=convnext_test", "task=retrieval", "data=imagefolder", f"data.root={root}",
                   "data.image_size=32", "data.num_workers=0", "data.batch_size=4")
    m = train(cfg, tmp_path / "run")["metrics"]
    assert (m["num_queries"], m["excluded_queries"]) == (4, 2)  # the green queries have nothing to find
    assert m["recall_at_1"] == 1.0 and m["map"] == pytest.approx(1.0) and m["map_at_r"] == pytest.approx(1.0)
