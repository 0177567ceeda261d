"""Training-free probes of a frozen backbone's embedding: image retrieval and a kNN classifier.

Both embed images with the backbone's own ``embed`` (its pooling or class token), L2-normalize
the embeddings and compare them by cosine similarity (a dot product of unit vectors). Nothing is
trained: ``train.py`` only tests these tasks (``trains = False``).

**Retrieval** ranks a gallery for every query: the ``gallery`` split of the data when it has one
(``query/`` and ``gallery/`` class folders), else the test split against itself, leave-one-out
(a query is never its own gallery item). A gallery item is relevant to a query when it has the
query's class; ``R`` is the number of relevant items. The ranking sorts similarity from high to
low; equal similarities keep gallery order (the lower gallery index first), so results are
deterministic. With ``rel_i`` = 1 when the item at rank ``i`` (from 1) is relevant and
``P@i`` = (relevant items in the first ``i``) / ``i``:

- ``recall_at_k``: the fraction of queries with at least one relevant item in the first ``k``;
- ``map``: mean over queries of ``AP = (1/R) * sum_i rel_i * P@i`` over the whole ranking;
- ``map_at_r``: mean over queries of ``(1/R) * sum_{i <= R} rel_i * P@i`` (Musgrave et al., 2020).

A query whose class has no item in the gallery (R = 0) has no defined AP or recall: it is left
out of every mean and counted in ``excluded_queries``; ``num_queries`` counts the others.

**kNN** (DINO's protocol, Caron et al. 2021): the training split embedded without augmentation is
the memory bank; each test image takes its ``k`` most similar bank items (same tie rule), each
votes for its class with weight ``exp(similarity / temperature)``, and the class scores give
``acc1``/``acc5``. Extra test sets of the data (OOD sets) are scored the same way as
``ood/<name>/acc1``.

Similarities are computed on the run's device ``chunk_size`` queries at a time against the whole
gallery, so memory grows with ``chunk_size x gallery`` and never with ``queries x gallery``. The
probes run in one process (``trainer.devices=1``): every query needs the whole gallery.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_accuracy

from backbones import Backbone

from .base import TaskModule

RECALL_KS = (1, 5, 10)


def _ranked(queries: torch.Tensor, gallery: torch.Tensor, k: int | None = None,
            exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarities and gallery indices of each query's ranking (best first, ties in gallery order).

    ``exclude[q]`` is a gallery index ranked last for query ``q`` (its own image, leave-one-out).
    """
    sims = queries @ gallery.T
    if exclude is not None:
        sims[torch.arange(len(sims), device=sims.device), exclude] = -torch.inf
    sims, order = torch.sort(sims, dim=1, descending=True, stable=True)
    return sims[:, :k], order[:, :k]


def retrieval_metrics(queries: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor | None = None,
                      gallery_labels: torch.Tensor | None = None, *, ks: Iterable[int] = RECALL_KS,
                      chunk_size: int = 256) -> dict[str, float]:
    """Recall@k, mAP@R and mAP of L2-normalized ``queries`` against ``gallery`` (see the module docstring).

    Without a gallery, the queries are the gallery, leave-one-out.

    >>> e = F.normalize(torch.tensor([[1., 0.], [1., .1], [0., 1.], [.1, 1.]]), dim=1)
    >>> m = retrieval_metrics(e, torch.tensor([0, 0, 1, 1]), ks=(1,))
    >>> m["recall_at_1"], m["map"], m["num_queries"]
    (1.0, 1.0, 4.0)
    """
    leave_one_out = gallery is None
    if leave_one_out:
        gallery, gallery_labels = queries, query_labels
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ks = tuple(ks)
    hits = {k: [] for k in ks}
    ap, ap_r = [], []
    for start in range(0, len(queries), chunk_size):
        q, y = queries[start:start + chunk_size], query_labels[start:start + chunk_size]
        own = torch.arange(start, start + len(q), device=q.device) if leave_one_out else None
        _, order = _ranked(q, gallery, exclude=own)
        rel = gallery_labels[order] == y[:, None]
        if leave_one_out:
            rel[:, -1] = False  # the query itself, ranked last
        num_rel = rel.sum(1)
        keep = num_rel > 0
        rel, num_rel = rel[keep].float(), num_rel[keep].float()
        ranks = torch.arange(1, rel.shape[1] + 1, device=rel.device, dtype=rel.dtype)
        precision = rel.cumsum(1) / ranks
        ap.append((precision * rel).sum(1) / num_rel)
        within_r = ranks[None, :] <= num_rel[:, None]
        ap_r.append((precision * rel * within_r).sum(1) / num_rel)
        for k in ks:
            hits[k].append(rel[:, :k].amax(1))
    ap_all = torch.cat(ap)
    n = len(ap_all)
    out = {f"recall_at_{k}": float(torch.cat(hits[k]).mean()) if n else float("nan") for k in ks}
    out["map_at_r"] = float(torch.cat(ap_r).mean()) if n else float("nan")
    out["map"] = float(ap_all.mean()) if n else float("nan")
    out["num_queries"] = float(n)
    out["excluded_queries"] = float(len(queries) - n)
    return out


def knn_class_scores(queries: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, *, num_classes: int,
                     k: int = 20, temperature: float = 0.07, chunk_size: int = 256) -> torch.Tensor:
    """DINO's weighted kNN vote: ``[Q, num_classes]`` sums of ``exp(sim / temperature)`` over the ``k`` nearest.

    >>> bank = F.normalize(torch.tensor([[1., 0.], [0., 1.], [1., .2]]), dim=1)
    >>> knn_class_scores(bank[:1], bank, torch.tensor([0, 1, 0]), num_classes=2, k=2).argmax(1).tolist()
    [0]
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"kNN needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    scores = []
    for start in range(0, len(queries), chunk_size):
        sims, idx = _ranked(queries[start:start + chunk_size], bank, k=k)
        votes = torch.zeros(len(sims), num_classes, device=sims.device, dtype=sims.dtype)
        scores.append(votes.scatter_add_(1, bank_labels[idx], (sims / temperature).exp()))
    return torch.cat(scores)


def _concat(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class EmbeddingTask(TaskModule):
    """Shared by retrieval and kNN: a frozen backbone whose normalized embeddings are collected per test set."""

    trains = False
    reference_split: str | None = None  # embedded in ``on_test_start``: the gallery or the memory bank

    def __init__(self, *, backbone: Backbone, num_classes: int, chunk_size: int = 256) -> None:
        super().__init__(backbone=backbone, mode="frozen")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.num_classes, self.chunk_size = num_classes, chunk_size
        self.reference: tuple[torch.Tensor, torch.Tensor] | None = None
        self.collected: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.scores: dict[str, float] = {}

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalized float32 embeddings ``[B, C]``."""
        return F.normalize(self.backbone.embed(x).float(), dim=1)

    def _embed_all(self, loader: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        return _concat([(self(x.to(self.device)), y.to(self.device)) for x, y in loader])

    def on_test_start(self) -> None:
        if self.trainer.world_size > 1:
            raise ValueError(f"task {self.name!r} ({type(self).__name__}) compares every query with the whole "
                             f"gallery on one device, but the trainer runs {self.trainer.world_size} processes; "
                             f"run it with trainer.devices=1 (it trains nothing, so one device is enough)")
        self.collected = {}
        self.reference = None
        dm = self.trainer.datamodule
        if self.reference_split is not None and dm is not None and dm.has_split(self.reference_split):
            self.reference = self._embed_all(dm.eval_loader(self.reference_split))

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        self.collected.setdefault(dataloader_idx, []).append((self(x), y))

    def collected_set(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and labels of test set ``index`` (dataloader order)."""
        return _concat(self.collected[index])

    def test_metrics(self) -> dict[str, float]:
        return dict(self.scores)

    def _log_all(self, scores: dict[str, float]) -> None:
        self.scores = scores
        for key, value in scores.items():
            self.log(f"test/{key}", value, add_dataloader_idx=False)


class RetrievalTask(EmbeddingTask):
    """Image retrieval on frozen embeddings: Recall@1/5/10, mAP@R and mAP (see the module docstring)."""

    name = "retrieval"
    primary_metric = "map_at_r"
    reference_split = "gallery"

    def on_test_epoch_end(self) -> None:
        queries, labels = self.collected_set(0)
        gallery, gallery_labels = self.reference if self.reference is not None else (None, None)
        self._log_all(retrieval_metrics(queries, labels, gallery, gallery_labels, chunk_size=self.chunk_size))


class KNNTask(EmbeddingTask):
    """DINO's weighted kNN classifier on frozen embeddings, the training split as memory bank."""

    name = "classification"
    primary_metric = "acc1"
    reference_split = "bank"

    def __init__(self, *, backbone: Backbone, num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk_size: int = 256) -> None:
        super().__init__(backbone=backbone, num_classes=num_classes, chunk_size=chunk_size)
        if k < 1 or temperature <= 0:
            raise ValueError(f"kNN needs task.k >= 1 and task.temperature > 0, got k={k}, temperature={temperature}")
        self.k, self.temperature = k, temperature

    def on_test_start(self) -> None:
        super().on_test_start()
        if self.reference is None:
            raise ValueError("the kNN probe needs the data's training split as memory bank; "
                             "use data=shapes or data=imagefolder with a train/ folder")

    def on_test_epoch_end(self) -> None:
        bank, bank_labels = self.reference
        scores = {}
        for index, split in enumerate(self.test_split_names()):
            queries, labels = self.collected_set(index)
            votes = knn_class_scores(queries, bank, bank_labels, num_classes=self.num_classes, k=self.k,
                                     temperature=self.temperature, chunk_size=self.chunk_size)
            prefix = "" if split == "test" else f"{split}/"
            for name, top in (("acc1", 1), ("acc5", min(5, self.num_classes))):
                scores[prefix + name] = float(multiclass_accuracy(votes, labels, num_classes=self.num_classes,
                                                                  top_k=top, average="micro"))
        self._log_all(scores)
