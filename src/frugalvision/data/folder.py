"""Image-folder classification dataset (``root/<class>/<image>``) with checked inputs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset

from ..errors import DataError
from .images import IMAGE_EXTENSIONS, check_images, load_image

__all__ = ["ImageFolderDataset"]

log = logging.getLogger(__name__)


class ImageFolderDataset(Dataset):
    """Classification images laid out as ``root/<class_name>/<file>``; classes sorted by name.

    Args:
        root: Folder with one sub-folder per class.
        transform: Callable applied to the PIL image (e.g. :func:`~frugalvision.data.build_transforms`).
        channels: 3 (RGB) or 1 (grayscale).
        convert: Convert other 8-bit image modes to ``channels``; when False a mismatch is an error.
        on_error: ``raise`` (default): a bad image raises a :class:`DataError` naming it, here and not mid-epoch.
            ``skip``: bad images are dropped and listed in :attr:`skipped`.
        classes: Expected class names (e.g. the training set's), so labels agree across splits.
        extensions: File suffixes treated as images; other files are ignored.
        verify: Decode every image once now (:func:`~frugalvision.data.images.check_images`; verdicts are cached
            by path, size and modification time, so a re-run reads nothing). With False a bad file is found
            only when it is read.
        progress: Progress bar while checking (shown for 50 or more unchecked files).

    Raises:
        DataError: If the root is missing, has no class folders, a class folder holds no image, an image is
            unreadable (``on_error="raise"``), or ``classes`` names a folder that is absent.

    Example:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> for c in ("a", "b"):
        ...     (root / c).mkdir(); Image.new("RGB", (8, 8)).save(root / c / "x.png")
        >>> ds = ImageFolderDataset(root); (len(ds), ds.classes, ds[1][1])
        (2, ['a', 'b'], 1)
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Any], Any] | None = None,
        channels: int = 3,
        convert: bool = True,
        on_error: Literal["raise", "skip"] = "raise",
        classes: Sequence[str] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        verify: bool = True,
        progress: bool = True,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        self.channels = channels
        self.convert = convert
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if not self.root.is_dir():
            raise DataError(f"dataset folder {self.root} does not exist or is not a folder")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not found:
            raise DataError(f"dataset folder {self.root} has no class sub-folders; expected root/<class>/<image>")
        if classes is not None:
            missing = [c for c in classes if c not in found]
            if missing:
                raise DataError(f"dataset folder {self.root} lacks class folder(s) {', '.join(missing)}")
            extra = [c for c in found if c not in classes]
            if extra:
                raise DataError(
                    f"dataset folder {self.root} has class folder(s) {', '.join(extra)} not in the class list"
                )
        self.classes: list[str] = list(classes) if classes is not None else found
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        exts = tuple(e.lower() for e in extensions)
        self.samples: list[tuple[Path, int]] = []
        for c in self.classes:
            files = sorted(p for p in (self.root / c).rglob("*") if p.is_file() and p.suffix.lower() in exts)
            if not files:
                raise DataError(f"class folder {self.root / c} holds no images ({', '.join(exts)})")
            self.samples += [(p, self.class_to_idx[c]) for p in files]
        self.skipped: list[tuple[Path, str]] = []
        if verify:
            verdicts = check_images([p for p, _ in self.samples], channels, convert, progress=progress,
                                    desc=f"checking {self.root.name}")
            bad = [(p, v) for p, v in verdicts.items() if isinstance(v, str)]
            if bad and on_error == "raise":
                more = f" (and {len(bad) - 1} more unreadable file(s))" if len(bad) > 1 else ""
                raise DataError(f"{bad[0][1]}{more}; or pass on_error='skip' to leave unreadable images out")
            for p, msg in bad:
                self.skipped.append((p, msg))
                log.warning("skipping %s", msg)
            if bad:
                drop = {p for p, _ in bad}
                self.samples = [(p, y) for p, y in self.samples if p not in drop]
            if not self.samples:
                raise DataError(f"dataset folder {self.root}: every image is unreadable")

    @property
    def targets(self) -> list[int]:
        """The label of every sample, in order."""
        return [y for _, y in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        img = load_image(path, self.channels, self.convert)
        return (self.transform(img) if self.transform is not None else img), label
