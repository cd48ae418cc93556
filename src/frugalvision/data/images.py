"""Reading images safely: every failure names the file and says what to do."""

from __future__ import annotations

import sqlite3
import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ..utils.io import cache_dir

__all__ = ["IMAGE_EXTENSIONS", "check_images", "load_image"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

_CHANNELS = {"1": 1, "L": 1, "P": 3, "RGB": 3, "RGBA": 4, "LA": 2, "CMYK": 4, "YCbCr": 3, "LAB": 3, "HSV": 3}
_HIGH_DEPTH = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")


def load_image(path: str | Path, channels: int = 3, convert: bool = True) -> Image.Image:
    """Open an image fully (decoding it now, not lazily) as ``RGB`` (3 channels) or ``L`` (1 channel).

    Args:
        path: Image file.
        channels: 3 for RGB, 1 for grayscale.
        convert: Convert other 8-bit modes (grayscale, palette, RGBA, CMYK) to the wanted channel count; when
            False an image whose channel count differs raises instead.

    Returns:
        A decoded PIL image in mode ``RGB`` or ``L``.

    Raises:
        DataError: If the file is missing, unreadable, truncated, of a high bit depth, or (with
            ``convert=False``) has the wrong number of channels.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "g.png"; Image.new("L", (4, 4)).save(p)
        >>> load_image(p).mode
        'RGB'
    """
    path = Path(path)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if not path.is_file():
        raise DataError(f"image {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                img = img.copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise DataError(
            f"cannot read image {path}: {exc}; the file is corrupt or not an image — replace or remove it"
        ) from None
    if img.mode in _HIGH_DEPTH:
        raise DataError(
            f"image {path} has mode {img.mode} (16-bit or float pixels); only 8-bit images are supported — convert "
            "it to 8-bit PNG first"
        )
    want = "RGB" if channels == 3 else "L"
    if img.mode == want:
        return img
    have = _CHANNELS.get(img.mode)
    if have is None:
        raise DataError(f"image {path} has unsupported mode {img.mode}; save it as 8-bit RGB or grayscale")
    if not convert and have != channels:
        raise DataError(
            f"image {path} has {have} channel(s) (mode {img.mode}) but {channels} are expected; convert the file or "
            "allow conversion (convert=True)"
        )
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert(want)


# --------------------------------------------------------------------------------------------- checking up front
_CHECK_VERSION = 1  # bump when load_image's rules change, so cached verdicts are recomputed


def _check_db() -> sqlite3.Connection | None:
    """The verdict cache (``<cache>/image_checks.sqlite``); None when it cannot be opened (checks still run)."""
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(folder / "image_checks.sqlite", timeout=30)
        db.execute("CREATE TABLE IF NOT EXISTS checks (key TEXT PRIMARY KEY, verdict TEXT)")
        return db
    except (sqlite3.Error, OSError):
        return None


def _key(path: Path, how: str) -> str | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return f"{_CHECK_VERSION}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{how}"


def _decode_mask(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            im.load()
            return im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read mask {path}: {exc}; the file is corrupt or not an image") from None


def check_images(paths: Sequence[str | Path], channels: int = 3, convert: bool = True, progress: bool = True,
                 desc: str = "checking images", cache: bool = True, masks: bool = False
                 ) -> dict[Path, tuple[int, int] | str]:
    """Decode every image once, up front, and say which are usable: ``{path: (width, height) or error message}``.

    A corrupt file is found before training starts, not when a batch first reads it mid-epoch. Verdicts are
    cached (``$FRUGALVISION_CACHE/image_checks.sqlite``) keyed by the file's resolved path, size and modification
    time, so a re-run over the same files reads nothing; a changed file is checked again.

    Args:
        paths: Image files.
        channels: As :func:`load_image`.
        convert: As :func:`load_image`.
        progress: Show a progress bar over the files that need decoding.
        desc: The progress bar's label.
        cache: Read and write the verdict cache.
        masks: The files are masks (any 8-bit or 16-bit mode; decoded, not converted).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); Image.new("RGB", (5, 4)).save(d / "ok.png")
        >>> _ = (d / "bad.png").write_bytes(b"not a png")
        >>> res = check_images([d / "ok.png", d / "bad.png"], progress=False, cache=False)
        >>> res[d / "ok.png"], res[d / "bad.png"].startswith("cannot read image")
        ((5, 4), True)
    """
    out: dict[Path, tuple[int, int] | str] = {}
    how = "mask" if masks else f"{channels}|{int(convert)}"
    keys = {Path(p): _key(Path(p), how) for p in paths}
    db = _check_db() if cache else None
    known: dict[str, str] = {}
    if db is not None:
        wanted = [k for k in keys.values() if k]
        try:
            for i in range(0, len(wanted), 500):
                chunk = wanted[i:i + 500]
                rows = db.execute(f"SELECT key, verdict FROM checks WHERE key IN ({','.join('?' * len(chunk))})",
                                  chunk).fetchall()
                known.update(rows)
        except sqlite3.Error:
            known = {}
    todo = []
    for p, k in keys.items():
        v = known.get(k) if k else None
        if v is None:
            todo.append(p)
        else:
            out[p] = tuple(int(x) for x in v[3:].split(",")) if v.startswith("ok:") else v[4:]  # type: ignore[assignment]
    new: list[tuple[str, str]] = []
    if todo:
        from tqdm.auto import tqdm

        for p in tqdm(todo, desc=desc, unit="img", disable=not progress or len(todo) < 50, leave=False):
            try:
                size = _decode_mask(p) if masks else load_image(p, channels, convert).size
                out[p] = size
                verdict = f"ok:{size[0]},{size[1]}"
            except DataError as exc:
                out[p] = str(exc)
                verdict = f"err:{exc}"
            k = keys[p] or _key(p, how)
            if k and Path(p).exists():
                new.append((k, verdict))
    if db is not None:
        try:
            if new:
                with db:
                    db.executemany("INSERT OR REPLACE INTO checks VALUES (?, ?)", new)
        except sqlite3.Error:
            pass
        finally:
            db.close()
    return {Path(p): out[Path(p)] for p in paths}
