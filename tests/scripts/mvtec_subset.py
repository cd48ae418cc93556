"""Copy part of the bundled inspection benchmark, in MVTec AD layout, for CLI tests."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from frugalvision.inspect.bundled import build_benchmark


def copy_subset(root: Path, categories: Sequence[str], counts: Sequence[tuple[str, int]]) -> Path:
    """The first ``n`` images of each ``(sub folder, n)`` of every category (with the defects' masks) under ``root``."""
    src = build_benchmark()
    for cat in categories:
        for sub, n in counts:
            (root / cat / sub).mkdir(parents=True)
            for f in sorted((src / cat / sub).glob("*.png"))[:n]:
                shutil.copy(f, root / cat / sub / f.name)
                if "good" not in sub:
                    gt = root / cat / "ground_truth" / sub.split("/")[1]
                    gt.mkdir(parents=True, exist_ok=True)
                    shutil.copy(src / cat / "ground_truth" / sub.split("/")[1] / f"{f.stem}_mask.png", gt)
    return root
