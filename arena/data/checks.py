"""Up-front data checks: a datamodule's setup looks at every split's files once, before any training step,
and reports every problem together, each with its file and its fix.

``verify`` says how images are read: ``header`` (the default) opens each image and reads its size;
PNGs also get their chunk checksums verified (PIL ``verify``) and JPEGs must end with an
end-of-image marker, which finds truncated files without decoding them; ``full`` decodes every
image; ``none`` skips image and mask reads (annotation checks stay: they read no image).

>>> import tempfile
>>> from PIL import Image
>>> d = Path(tempfile.mkdtemp())
>>> Image.effect_noise((64, 48), 60).convert("RGB").save(d / "a.jpg")
>>> _ = (d / "b.jpg").write_bytes((d / "a.jpg").read_bytes()[:-200])  # cut short, as an interrupted copy
>>> check = DataCheck()
>>> check.images([d / "a.jpg", d / "b.jpg"])[d / "a.jpg"]
(64, 48)
>>> check.raise_if_any("demo")  # doctest: +ELLIPSIS
Traceback (most recent call last):
ValueError: data 'demo': 1 problem found before training...b.jpg: is a truncated JPEG (no end-of-image marker)...
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from PIL import Image

VERIFY_MODES = ("header", "full", "none")
MAX_LISTED = 50
IMAGE_FIX = "re-save it with an image tool or remove it (and its annotations)"
T = TypeVar("T")
R = TypeVar("R")


def _jpeg_complete(path: Path) -> bool:
    """Whether a JPEG file holds its end-of-image marker (trailing bytes after it are allowed)."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 1024))
        return b"\xff\xd9" in f.read()


def inspect_image(path: Path, verify: str = "header") -> tuple[tuple[int, int] | None, str | None]:
    """``((W, H), None)`` for a readable image, ``(None, what is wrong)`` otherwise."""
    try:
        with Image.open(path) as im:
            size, fmt = im.size, im.format
            if verify == "full":
                im.load()
            else:
                im.verify()
    except FileNotFoundError:
        return None, "does not exist"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return None, f"cannot be decoded ({e})"
    if verify == "header" and fmt == "JPEG" and not _jpeg_complete(path):
        return None, "is a truncated JPEG (no end-of-image marker)"
    return size, None


class DataCheck:
    """What setup found wrong with a dataset, and the (W, H) of every image it read."""

    def __init__(self, *, verify: str = "header", workers: int = 1) -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"data.verify={verify!r} is not one of {VERIFY_MODES}: header (read each image's header, "
                             f"the default), full (decode every image) or none (skip image reads)")
        self.verify, self.workers = verify, max(1, workers)
        self.problems: dict[str, None] = {}  # ordered and without repeats (val and test often share files)
        self.sizes: dict[Path, tuple[int, int]] = {}
        self.seen: set[Path] = set()

    def add(self, where: str | Path, problem: str, fix: str) -> None:
        """Note one problem: where it is (a file), what is wrong, and how to fix it."""
        self.problems[f"{where}: {problem}; fix: {fix}"] = None

    def map(self, fn: Callable[[T], R], items: list[T]) -> list[R]:
        """``fn`` over ``items`` on ``workers`` threads (image decoding releases the GIL)."""
        if self.workers == 1 or len(items) < 2:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(fn, items, chunksize=32))

    def images(self, paths: Iterable[Path]) -> dict[Path, tuple[int, int]]:
        """Check ``paths`` as ``verify`` says (each file once); returns the sizes of every good image seen so far."""
        if self.verify == "none":
            return self.sizes
        todo = [p for p in dict.fromkeys(paths) if p not in self.seen]
        self.seen.update(todo)
        for path, (size, problem) in zip(todo, self.map(lambda p: inspect_image(p, self.verify), todo)):
            if problem is None:
                self.sizes[path] = size
            else:
                self.add(path, problem, IMAGE_FIX)
        return self.sizes

    def raise_if_any(self, name: str) -> None:
        """``ValueError`` listing every problem (the first ``MAX_LISTED``) when there is any."""
        if not self.problems:
            return
        lines = list(self.problems)
        more = [f"... and {len(lines) - MAX_LISTED} more"] if len(lines) > MAX_LISTED else []
        s = "s" if len(lines) > 1 else ""
        raise ValueError(f"data {name!r}: {len(lines)} problem{s} found before training, so nothing was trained:\n  "
                         + "\n  ".join(lines[:MAX_LISTED] + more)
                         + "\n(data.verify=none skips the image and mask reads, not the annotation checks)")


__all__ = ["DataCheck", "inspect_image", "VERIFY_MODES"]
