"""Images as SVG text (frugalvision.language.svg) and ``frugalvision svg`` (pipelines/svg.py)."""

from __future__ import annotations

import csv
import re
import sys

import numpy as np
import pytest
from PIL import Image

from frugalvision.errors import ConfigError, DataError, MissingDependencyError
from frugalvision.language import svg as S
from frugalvision.pipelines.svg import CSV_COLUMNS, SVGConfig, run_svg

pytest.importorskip("vtracer")
pytest.importorskip("resvg_py")


def disc(size: int = 64, radius: float = 18, fg=(200, 30, 30), bg=(255, 255, 255)) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    img = np.empty((size, size, 3), np.uint8)
    img[:] = bg
    img[(yy - size / 2) ** 2 + (xx - size / 2 + 2) ** 2 < radius**2] = fg
    return img


def chars(text: str) -> list[str]:
    """A character-level tokenizer: exact, known counts."""
    return list(text)


def photo(size: int = 64) -> np.ndarray:
    from skimage import data

    return data.camera()[100:100 + size, 200:200 + size]


# ------------------------------------------------------------------------------------------------ vectorise
@pytest.mark.parametrize("mode", ["color", "binary"])
def test_disc_round_trip(mode):
    img = disc()
    res = S.vectorize(img, mode=mode)
    assert res.paths >= 1 and res.chars == len(res.svg) and res.tokens is None
    assert res.svg.startswith('<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">')
    assert "<?xml" not in res.svg and "<!--" not in res.svg and "transform" not in res.svg
    assert not re.search(r"\d\.\d", res.svg), "precision=0 writes integer coordinates"
    f = S.fidelity(img, res)
    assert f["iou_fg"] > 0.9, f
    assert f["psnr"] > 20, f
    out = S.rasterize(res.svg, 64, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert tuple(out[32, 30]) == pytest.approx((204, 34, 34), abs=1)  # 12-bit colour of (200, 30, 30)


def test_compact_path_matches_vtracer_output():
    """Folding vtracer's translate into relative, rounded coordinates draws the same picture."""
    img = disc(96, 30, fg=(0, 0, 0))
    img[20:40, 60:80] = (0, 90, 200)
    raw = S._trace(img, {"trace": "polygon", "filter_speckle": 2, **S._SPLINE}, "color")
    ours = S.vectorize(img, precision=2).svg
    a, b = S.rasterize(raw, 96, 96), S.rasterize(ours, 96, 96)
    assert np.abs(a.astype(int) - b).mean() < 2.0


def test_precision_and_tokens():
    img = disc()
    r0 = S.vectorize(img, precision=0, tokenizer=chars, trace="spline")
    r2 = S.vectorize(img, precision=2, tokenizer=chars, trace="spline")  # polygons lie on the pixel grid
    assert r0.tokens == r0.chars and r2.tokens == r2.chars
    assert re.search(r"\d\.\d", r2.svg) and r2.chars > r0.chars
    assert S.count_tokens("abc") is None and S.estimate_tokens("a" * 12) == int(np.ceil(12 / S.CHARS_PER_TOKEN))


def test_budget_search_respects_max_tokens():
    img = photo(64)
    full = S.vectorize(img, tokenizer=chars)
    for budget in (400, 900):
        assert full.tokens > budget
        res = S.vectorize(img, max_tokens=budget, tokenizer=chars)
        assert res.tokens <= budget and len(res.svg) == res.tokens
        s = res.settings
        assert s["max_tokens"] == budget and s["counted_by"] == "tokenizer" and s["fitting"] >= 1
        assert s["colors"] <= 8 and s["scale"] <= 1.0 and s["tried"] > 1
        assert s["psnr"] == pytest.approx(S.fidelity(img, res)["psnr"], abs=1e-3)
    est = S.vectorize(img, max_tokens=600)  # no tokenizer: the estimate is what must fit
    assert est.tokens is None and est.budget_tokens <= 600 and est.settings["counted_by"] == "estimate"


def test_budget_fits_already_keeps_the_requested_settings():
    res = S.vectorize(disc(), max_tokens=10_000, tokenizer=chars)
    assert (res.settings["colors"], res.settings["scale"], res.settings["filter_speckle"]) == (8, 1.0, 2)


def test_budget_too_small_is_an_error():
    with pytest.raises(DataError, match=r"fits max_tokens=20: the smallest has \d+ tokens"):
        S.vectorize(photo(64), max_tokens=20, tokenizer=chars)


# ------------------------------------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("mode", ["color", "binary"])
@pytest.mark.parametrize("value", [0, 128, 255])
def test_constant_image_is_its_background(mode, value):
    """One colour: a background <rect> and no path (never an empty SVG), rendered back exactly."""
    img = np.full((24, 40), value, np.uint8)
    res = S.vectorize(img, mode=mode)
    assert res.paths == 0 and "<rect" in res.svg and "<path" not in res.svg
    out = S.rasterize(res.svg, 40, 24)
    assert np.abs(out.astype(int) - value).max() <= 8  # 12-bit colour
    assert S.fidelity(img, res)["iou_fg"] == 1.0


def test_empty_image_is_an_error():
    with pytest.raises(DataError, match="empty image"):
        S.vectorize(np.zeros((0, 5, 3), np.uint8))


def test_trace_that_loses_the_content_is_an_error():
    img = np.zeros((32, 32), np.uint8)
    img[10:12, 10:12] = 255  # a 2x2 dot: every patch under 8x8 px is filtered
    with pytest.raises(DataError, match="no path"):
        S.vectorize(img, mode="binary", filter_speckle=8)
    with pytest.raises(DataError, match="empty SVG"):
        S.vectorize(img, mode="color", filter_speckle=8)


def test_bad_settings():
    with pytest.raises(ConfigError, match="colors"):
        S.vectorize(disc(), colors=1)
    with pytest.raises(ConfigError, match="mode"):
        S.vectorize(disc(), mode="gray")
    with pytest.raises(ConfigError, match="max_tokens"):
        S.vectorize(disc(), max_tokens=0)


def test_inputs_arrays_pil_files(tmp_path):
    img = disc()
    ref = S.vectorize(img).svg
    assert S.vectorize(Image.fromarray(img)).svg == ref
    assert S.vectorize(img.astype(np.float32) / 255).svg == ref
    Image.fromarray(img).save(tmp_path / "d.png")
    assert S.vectorize(tmp_path / "d.png").svg == ref
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"bad\.png"):
        S.vectorize(tmp_path / "bad.png")


def test_pixels_as_text_baseline():
    img = photo(64)
    text, back, n = S.pixels_as_text(img, 500, tokenizer=chars)
    assert n == len(text) <= 500 and back.shape == (64, 64, 3)
    rows = text.splitlines()
    side = len(rows)
    assert all(len(r.split()) == side for r in rows) and side < 64
    bigger = S.pixels_as_text(img, 2000, tokenizer=chars)
    assert len(bigger[0].splitlines()) > side


def test_missing_extra_names_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vtracer", None)  # `import vtracer` now fails
    with pytest.raises(MissingDependencyError, match=r'pip install "frugalvision\[svg\]"'):
        S.vectorize(disc())
    Image.fromarray(disc()).save(tmp_path / "d.png")
    with pytest.raises(MissingDependencyError, match=r'pip install "frugalvision\[svg\]"'):
        run_svg(SVGConfig(images=[str(tmp_path / "d.png")], out=str(tmp_path / "out"), progress=False))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ the command
def _images(folder, n=2):
    folder.mkdir()
    Image.fromarray(disc()).save(folder / "disc.png")
    if n > 1:
        Image.fromarray(photo(48)).save(folder / "camera.png")
    return folder


def test_run_svg_writes_svg_png_csv(tmp_path):
    images = _images(tmp_path / "images")
    out = tmp_path / "out"
    res = run_svg(SVGConfig(images=[str(images)], out=str(out), max_tokens=700, progress=False))
    assert (res["images"], res["written"], res["skipped"]) == (2, 2, 0)
    for stem in ("disc", "camera"):
        text = (out / f"{stem}.svg").read_text()
        assert text.startswith("<svg") and text.rstrip().endswith("</svg>")
        assert np.asarray(Image.open(out / f"{stem}.png")).shape[:2] == ((64, 64) if stem == "disc" else (48, 48))
    rows = list(csv.DictReader((out / "svg.csv").read_text().splitlines()))
    assert tuple(rows[0]) == CSV_COLUMNS and [r["status"] for r in rows] == ["ok", "ok"]
    assert all(int(r["tokens"]) <= 700 and r["counted_by"] == "estimate" for r in rows)
    disc_row = next(r for r in rows if r["image"].endswith("disc.png"))
    assert float(disc_row["iou_fg"]) > 0.9


def test_run_svg_refuses_to_replace_outputs(tmp_path):
    images = _images(tmp_path / "images", n=1)
    cfg = SVGConfig(images=[str(images)], out=str(tmp_path / "out"), progress=False)
    run_svg(cfg)
    svg_file = tmp_path / "out" / "disc.svg"
    svg_file.write_text("mine")
    with pytest.raises(ConfigError, match="overwrite=true"):
        run_svg(cfg)
    assert svg_file.read_text() == "mine"
    cfg.overwrite = True
    run_svg(cfg)
    assert svg_file.read_text().startswith("<svg")


def test_run_svg_corrupt_image_is_one_line_naming_it(tmp_path):
    images = _images(tmp_path / "images", n=1)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError) as err:
        run_svg(SVGConfig(images=[str(images)], out=str(tmp_path / "out"), progress=False))
    msg = str(err.value)
    assert "broken.png" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists(), "nothing is written before every image is decoded"


def test_run_svg_budget_miss_is_skipped_and_reported(tmp_path, capsys):
    images = _images(tmp_path / "images", n=1)
    res = run_svg(SVGConfig(images=[str(images)], out=str(tmp_path / "out"), max_tokens=30, progress=False))
    assert (res["written"], res["skipped"]) == (0, 1)
    rows = list(csv.DictReader((tmp_path / "out" / "svg.csv").read_text().splitlines()))
    assert rows[0]["status"].startswith("skipped: no SVG") and "disc.png" in capsys.readouterr().err


def test_run_svg_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no images"):
        run_svg(SVGConfig(images=[]))
    with pytest.raises(ConfigError, match="colors"):
        run_svg(SVGConfig(images=["x.png"], colors=100))
    with pytest.raises(ConfigError, match="max_tokens"):
        run_svg(SVGConfig(images=["x.png"], max_tokens=0))


def test_cli_command_when_registered(tmp_path, capsys):
    """Through ``frugalvision svg`` once cli.py lists it: a corrupt image exits 1 with one line naming it."""
    from frugalvision import cli

    if "svg" not in cli.build_parser()[1]:
        pytest.skip("the svg command is not in cli.py's table yet")
    images = _images(tmp_path / "images", n=1)
    (images / "broken.png").write_bytes(b"junk")
    code = cli.main(["svg", str(images), f"out={tmp_path / 'out'}", "progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "broken.png" in err[0]
