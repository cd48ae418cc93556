"""Every benchmark and experiment script imports: a renamed or removed library name fails here, not in a long run.

The scripts are imported by path (their ``main`` does not run); a script whose import needs an optional package
that is not installed is skipped with the package's name.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "experiments").glob("*.py")])
# Packages a script may import that the package's extras do not install (reference implementations, rival tools).
OPTIONAL = {"anomalib", "fastervit", "openvino", "segmentation_models_pytorch"}


@pytest.mark.parametrize("path", SCRIPTS, ids=[f"{p.parent.name}/{p.name}" for p in SCRIPTS])
def test_script_imports(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", [str(path.parent), *sys.path])  # scripts import their neighbours
    name = f"_script_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top in OPTIONAL:
            pytest.skip(f"{path.name} needs the optional package {top!r}, which is not installed")
        raise
    assert callable(getattr(module, "main", None)), f"{path.name} has no main()"


def _load(path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys, "path", [str(path.parent), *sys.path])
    spec = importlib.util.spec_from_file_location(f"_script_run_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vlm_speed_quick_on_the_tiny_llm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread) -> None:
    """The VLM speed benchmark end to end on the tiny LLM: 8 configurations, exactly N tokens each, tables written."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import csv

    module = _load(ROOT / "benchmarks" / "vlm_speed.py", monkeypatch)
    out = tmp_path / "vlm_speed"
    assert module.main(["--llm", "tiny", "--quick", "--threads", "1", "--rounds", "1", "--new-tokens", "3",
                        "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert len(rows) == 8
    assert {(r["visual_tokens"], r["input_px"], r["dtype"], r["kv_cache"]) for r in rows} == {
        (n, px, d, c) for n, px in (("64", "256"), ("256", "512")) for d in ("fp32", "bf16") for c in ("True", "False")}
    assert all(float(r["ttft_ms"]) > 0 and float(r["decode_tok_s"]) > 0 and 0 < float(r["visual_share"]) < 1
               for r in rows)
    # fp32 without a KV cache decodes the same tokens as with it
    assert all(r["token_agreement"] == "1.0" for r in rows if r["dtype"] == "fp32")
    md = out.with_suffix(".md").read_text()
    assert md.startswith("# ") and "Command:" in md and "KV cache vs none" in md and "bf16 vs fp32" in md


def test_vlm_tasks_prior_answers_from_training_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The blind prior: the most common training answer per task and question type; refer → the kind's mean box."""
    from frugalvision.language.instructions import Instruction
    from frugalvision.language.metrics import score_answers

    module = _load(ROOT / "experiments" / "vlm_tasks.py", monkeypatch)

    def inst(task: str, answer: str, qtype: str = "", label: str = "", boxes=()) -> Instruction:
        return Instruction("a.png", None, 100, 100, task, f"[{task}] q", answer, qtype or task, list(boxes), label)

    train = [inst("vqa", "2", "count"), inst("vqa", "2", "count"), inst("vqa", "1", "count"),
             inst("vqa", "brick", "category", "brick"), inst("vqa", "brick", "category", "brick"),
             inst("vqa", "moon", "category", "moon"),
             inst("refer", "{<0><0><20><20>}", label="crack", boxes=[(0, 0, 20, 20)]),
             inst("refer", "{<20><20><40><40>}", label="crack", boxes=[(20, 20, 40, 40)]),
             inst("refer", "{<90><90><100><100>}", label="hole", boxes=[(90, 90, 100, 100)])]
    # the test answers differ from the training majority: a prior that peeks at them would score
    test = [inst("vqa", "1", "count"), inst("vqa", "moon", "category", "moon"),
            inst("refer", "{<10><10><30><30>}", label="crack", boxes=[(10, 10, 30, 30)])]
    answers = module.prior_answers(train, test)
    assert answers == ["2", "brick", "{<10><10><30><30>}"]  # refer: the crack's mean box, not the hole's
    scores = score_answers(test, answers)
    assert scores["vqa"]["acc"] == 0.0 and scores["refer"]["acc"] == 1.0
    with pytest.raises(SystemExit, match="no training instruction"):
        module.prior_answers(train, [inst("identify", "crack", label="crack", boxes=[(0, 0, 9, 9)])])
