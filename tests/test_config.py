from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from frugalvision.config import build_config, config_to_dict, load_yaml, parse_overrides
from frugalvision.errors import ConfigError


@dataclass
class Inner:
    lr: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)


@dataclass
class Cfg:
    epochs: int = 1
    name: str = "a"
    mode: Literal["fast", "slow"] = "fast"
    out: Path | None = None
    flag: bool = False
    layers: list[str] = field(default_factory=list)
    clip: float | None = None
    inner: Inner = field(default_factory=Inner)


def test_defaults_file_and_overrides_priority(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 3\nname: fromfile\ninner:\n  lr: 0.5\n")
    cfg = build_config(Cfg, f, ["name=cli", "inner.betas=[0.8, 0.9]", "flag=true", "out=/tmp/x"])
    assert cfg.epochs == 3  # file beats default
    assert cfg.name == "cli"  # override beats file
    assert cfg.inner.lr == 0.5 and cfg.inner.betas == (0.8, 0.9)
    assert cfg.flag is True and cfg.out == Path("/tmp/x")


def test_type_coercion_and_lists():
    cfg = build_config(Cfg, overrides=["epochs=4.0", "layers=a,b", "clip=1e-3", "clip=null"])
    assert cfg.epochs == 4 and cfg.layers == ["a", "b"] and cfg.clip is None
    assert build_config(Cfg, overrides=["clip=1e-3"]).clip == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "override, message",
    [
        ("epochs=abc", "epochs: expected an integer"),
        ("mode=medium", "is not one of"),
        ("flag=maybe", "expected true/false"),
        ("epochz=3", "did you mean epochs"),
        ("inner.lrr=1", "did you mean inner.lr"),
        ("novalue", "not of the form key=value"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config(Cfg, overrides=[override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_yaml(lst)


def test_round_trip_through_dict():
    cfg = build_config(Cfg, overrides=["out=runs/x", "inner.lr=0.2"])
    d = config_to_dict(cfg)
    assert d["out"] == "runs/x" and d["inner"]["lr"] == 0.2
    assert build_config(Cfg, overrides=d) == cfg


def test_string_fields_keep_the_text_as_typed():
    cfg = build_config(Cfg, overrides=["name=title: with colon", "out=007"])
    assert cfg.name == "title: with colon" and cfg.out == Path("007")
    assert build_config(Cfg, overrides=["name=yes"]).name == "yes"
    assert build_config(Cfg, overrides=["flag=yes"]).flag is True


def test_parse_overrides_nesting():
    parsed = parse_overrides(["a.b.c=1", "a.b.d=x"])
    assert parsed == {"a": {"b": {"c": "1", "d": "x"}}} and parsed["a"]["b"]["c"].parsed == 1
    with pytest.raises(ConfigError, match="conflicts"):
        parse_overrides(["a=1", "a.b=2"])
