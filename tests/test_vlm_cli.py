"""`frugalvision vlm train|test`, `ask`, `chat`, the vlm model file and `fv.vlm`, on the tiny LLM (no SmolLM2 load).

``llm=tiny`` is a small random LLaMA with a character tokenizer (no files); its answers mean nothing, so tests that
need a box in an answer replace the model's ``generate``.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
pytest.importorskip("peft")

from frugalvision.cli import main
from frugalvision.weights import (
    MODEL_META,
    read_model_info,
    read_weights,
    save_model_file,
    tensor_names,
    write_weights,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # check_report, as test_demo.py does

TINY = ["llm=tiny", "visual=test_resnet", "visual_weights=none", "img_size=64", "categories=[brick]",
        "steps=[2,2,2]", "batch_size=4", "limit_test=1", "max_new_tokens=8", "lora_r=4", "ckpt_every=1",
        "progress=false", "report_examples=2", "device=cpu"]


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vlm") / "run"
    assert main(["vlm", "train", *TINY, f"out={out}"]) == 0
    return out


@pytest.fixture
def grey(tmp_path) -> Path:
    p = tmp_path / "grey tile.png"
    Image.fromarray((np.arange(200 * 100) % 251).astype(np.uint8).reshape(100, 200), "L").save(p)
    return p


def _box_answers(monkeypatch, text: str, seen: list | None = None) -> None:
    from frugalvision.language.vlm_base import VisionLanguageModel

    def fake(self, pixels, prompts, max_new_tokens=32, **kw):
        if seen is not None:
            seen.append(prompts)
        return [text] * pixels.shape[0]

    monkeypatch.setattr(VisionLanguageModel, "generate", fake)


# --------------------------------------------------------------------------------------------- train / test
def test_train_writes_the_run_folder(run):
    for name in ("model.safetensors", "plan.json", "history.json", "metrics.json", "metrics.md", "answers.jsonl",
                 "report.html", "stage1/last.safetensors", "stage3/last.safetensors"):
        assert (run / name).is_file(), name
    info = read_model_info(run / "model.safetensors")
    assert info["kind"] == "vlm" and info["llm"] == "tiny" and info["visual"] == "test_resnet"
    assert info["visual_tokens"] == 4 and info["img_size"] == 64 and info["lora"]["r"] == 4
    assert info["llm_fingerprint"]["sha256"] and "[task]" in info["prompt_format"] and info["chat_template"]
    assert info["tasks"] == ["caption", "grounding", "vqa", "refer", "identify", "detection"]
    assert info["trees"] == {"tile": 200, "max_boxes": 6}  # the tree tiling `test` rebuilds its data with
    # only the projector, LoRA, ln_vision and the visual encoder: never the LLM's own weights
    names = tensor_names(run / "model.safetensors")
    llm_names = [n for n in names if n.startswith("llm.")]
    assert llm_names and all(".lora_" in n for n in llm_names)
    assert {n.split(".")[0] for n in names} == {"llm", "llama_proj", "ln_vision", "visual"}
    ckpt = [n for n in tensor_names(run / "stage2" / "last.safetensors") if n.startswith("model/llm.")]
    assert ckpt and all(".lora_" in n for n in ckpt)
    answers = [json.loads(line) for line in (run / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 6 and all("prediction" in a and "right" in a for a in answers)
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["scores"]) == {"inspection"} and "VLM" in metrics["scores"]["inspection"]
    assert "no detector + templates row" in metrics["baseline"]
    assert "| task | metric | n | VLM |" in (run / "metrics.md").read_text()
    history = json.loads((run / "history.json").read_text())["stages"]
    assert [h["kind"] for h in history] == ["align", "multitask", "mixed"] and all(len(h["losses"]) == 2
                                                                                   for h in history)
    assert history[0]["trainable_params"] < history[1]["trainable_params"]  # stage 1: projector only


def test_resume_equals_an_uninterrupted_run(run, tmp_path, monkeypatch, capsys):
    from frugalvision.engine.trainer import Trainer

    out = tmp_path / "killed"
    original = Trainer._train_step

    def interrupted(self, batch):
        if self.output_dir.name == "stage2" and self.step == 1:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(Trainer, "_train_step", interrupted)
    assert main(["vlm", "train", *TINY, f"out={out}"]) == 130
    assert (out / "stage2" / "last.safetensors").is_file() and not (out / "model.safetensors").exists()
    monkeypatch.setattr(Trainer, "_train_step", original)
    assert main(["vlm", "train", *TINY, f"out={out}"]) == 2  # a run is there: continue it or replace it
    assert "resume=auto" in capsys.readouterr().err
    assert main(["vlm", "train", *TINY, f"out={out}", "resume=auto"]) == 0
    a, b = read_weights(run / "model.safetensors"), read_weights(out / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical on CPU
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)  # LoRA did train
    answers = [json.loads(line)["prediction"] for line in (run / "answers.jsonl").read_text().splitlines()]
    assert answers == [json.loads(line)["prediction"] for line in (out / "answers.jsonl").read_text().splitlines()]


def test_an_existing_run_is_refused(run, capsys):
    assert main(["vlm", "train", *TINY, f"out={run}"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "already holds a run" in line and "overwrite=true" in line


def test_vlm_test_and_the_report_in_headless_chromium(run, tmp_path):
    from check_report import check_report

    assert main(["vlm", "test", f"out={run}", "limit_test=2", "max_new_tokens=4", "progress=false",
                 "report_examples=2", "device=cpu"]) == 0
    html = (run / "report.html").read_text()
    assert "Training" in html and "[refer]" in html and "[detection]" in html
    info = check_report(run / "report.html", screenshot=tmp_path / "shot.png")
    assert info["images"] >= 1 + 6 * 2 and info["broken"] == 0, info  # loss curve + 2 examples of 6 tasks
    assert info["errors"] == [], info["errors"]
    assert info["title"].startswith("frugalvision VLM")


def test_test_rebuilds_the_tree_tiling_of_the_model_file(run, tmp_path, monkeypatch):
    import frugalvision.pipelines.vlm as pv

    model = tmp_path / "model.safetensors"
    info = {**read_model_info(run / "model.safetensors"), "trees": {"tile": 300, "max_boxes": 2}}
    write_weights(model, read_weights(run / "model.safetensors"), metadata={MODEL_META: json.dumps(info)})
    seen = []
    real = pv.vlm_data

    def spy(data, test_data, split, cfg, tasks):
        seen.append((cfg.tree_tile, cfg.tree_max_boxes))
        return real("inspection", None, split, cfg, tasks)  # no tree images needed: only the tiling is checked

    monkeypatch.setattr(pv, "vlm_data", spy)
    common = ["vlm", "test", f"model_file={model}", "data=trees", "limit_test=1", "max_new_tokens=2",
              "progress=false", "device=cpu", "report_examples=0"]
    assert main([*common, f"out={tmp_path / 'a'}"]) == 0
    assert main([*common, f"out={tmp_path / 'b'}", "tree_tile=250"]) == 0  # the user's value wins
    assert seen == [(300, 2), (250, 2)]


# --------------------------------------------------------------------------------------------- ask / chat
def test_ask_draws_the_boxes_of_its_answer(run, grey, monkeypatch, capsys):
    _box_answers(monkeypatch, "{<10><20><50><60>}")
    model_file = f"model_file={run / 'model.safetensors'}"
    assert main(["ask", str(grey), "[refer]", "the", "crack", model_file]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "{<10><20><50><60>}" and "1 box drawn" in err
    drawn = run / "ask" / "grey tile_answer.png"
    img = np.asarray(Image.open(drawn))
    assert img.shape == (100, 200, 3) and tuple(img[20, 40]) == (235, 40, 40)  # x1 = 10 % of 200, y1 = 20 % of 100
    assert main(["ask", str(grey), "[refer] the crack", model_file]) == 2  # never overwritten silently
    assert "overwrite=true" in _one_line(capsys.readouterr().err)
    _box_answers(monkeypatch, "{<10><20><5><60>}")
    assert main(["ask", str(grey), "[refer] the crack", model_file, "overwrite=true"]) == 0
    assert "unparseable box: {<10><20><5><60>}" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["RGBA", "I;16", "P"])
def test_ask_takes_images_of_any_mode_and_size(run, tmp_path, mode, capsys):
    p = tmp_path / f"{mode.replace(';', '')}.png"
    if mode == "I;16":
        Image.fromarray((np.arange(37 * 53, dtype=np.uint16) * 20).reshape(37, 53)).save(p)
    else:
        Image.new("RGBA", (301, 17), (10, 200, 30, 128)).convert(mode).save(p)
    assert main(["ask", str(p), "is there a defect?", f"model_file={run / 'model.safetensors'}", "max_new_tokens=3",
                 f"out={tmp_path / 'a.png'}"]) == 0
    assert capsys.readouterr().out.strip()


def test_chat_keeps_the_conversation(run, grey, monkeypatch, capsys):
    seen: list = []
    _box_answers(monkeypatch, "yes", seen)
    monkeypatch.setattr(sys, "stdin", io.StringIO("is there a defect?\n\n[foo] x\n[refer] the crack\nexit\nnever\n"))
    assert main(["chat", str(grey), f"model_file={run / 'model.safetensors'}"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "yes" and out[1].startswith("error: unknown task tag [foo]") and out[2] == "yes" and len(out) == 3
    assert seen[0] == ["<Img><ImageHere></Img> [vqa] is there a defect?"]  # one turn: the plain prompt
    from frugalvision.language import load_vlm

    tok = load_vlm(run / "model.safetensors").tokenizer
    second = seen[1][0]
    after = tok.decode(second.after)
    assert after.count("<|im_start|>user") == 1 and "</Img> [vqa] is there a defect?" in after  # image: turn 1 only
    assert after.endswith("yes<|im_end|>\n<|im_start|>user\n[refer] the crack<|im_end|>\n<|im_start|>assistant\n")


def test_corrupt_image_is_one_line_and_exit_1(run, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    model_file = f"model_file={run / 'model.safetensors'}"
    assert main(["ask", str(bad), "what is this?", model_file]) == 1
    assert "bad.png" in _one_line(capsys.readouterr().err)
    monkeypatch_stdin = io.StringIO("hi\n")
    sys_stdin, sys.stdin = sys.stdin, monkeypatch_stdin
    try:
        assert main(["chat", str(bad), model_file]) == 1
    finally:
        sys.stdin = sys_stdin
    assert "bad.png" in _one_line(capsys.readouterr().err)


def test_unknown_task_and_empty_question_exit_2(run, grey, tmp_path, capsys):
    assert main(["vlm", "train", *TINY, "tasks=[refer,foo]", f"out={tmp_path / 'r'}"]) == 2
    assert "foo" in _one_line(capsys.readouterr().err) and not (tmp_path / "r").exists()
    assert main(["vlm", "train", *TINY, "stages=align:bar", f"out={tmp_path / 'r'}"]) == 2
    assert "bar" in _one_line(capsys.readouterr().err)
    assert main(["ask", str(grey), "[foo] where?", f"model_file={run / 'model.safetensors'}"]) == 2
    assert "unknown task tag [foo]" in _one_line(capsys.readouterr().err)
    assert main(["ask", str(grey), "[refer]", f"model_file={run / 'model.safetensors'}"]) == 2
    assert "empty" in _one_line(capsys.readouterr().err)


def test_model_files_of_another_kind_are_refused_in_one_line(run, grey, tmp_path, capsys):
    other = tmp_path / "classifier.safetensors"
    save_model_file(torch.nn.Linear(2, 2), other, "classifier", "toy", classes=["a", "b"])
    assert main(["vlm", "test", f"model_file={other}", f"out={tmp_path / 'o'}"]) == 1
    assert "holds a classifier model" in _one_line(capsys.readouterr().err)
    assert main(["ask", str(grey), "hi", f"model_file={other}"]) == 1
    assert "holds a classifier model" in _one_line(capsys.readouterr().err)
    assert main(["eval", f"model_file={run / 'model.safetensors'}"]) == 2
    assert "frugalvision vlm test" in _one_line(capsys.readouterr().err)
    assert main(["predict", str(grey), f"model_file={run / 'model.safetensors'}", f"out={tmp_path / 'p'}"]) == 2
    assert "frugalvision ask" in _one_line(capsys.readouterr().err)


# --------------------------------------------------------------------------------------------- Python API
def test_python_api_load_ask_and_the_llm_fingerprint(run, grey):
    import frugalvision as fv
    from frugalvision.errors import CheckpointError
    from frugalvision.language.vlm_file import build_vlm_from_info

    model = fv.vlm.load_vlm(run / "model.safetensors")
    saved = read_weights(run / "model.safetensors")
    own = model.state_dict()
    assert own.keys() == saved.keys() and all(torch.equal(own[k], saved[k]) for k in own)
    ans = fv.vlm.ask(model, Image.open(grey), "how many defects?", max_new_tokens=3)
    assert ans.task == "vqa" and (ans.width, ans.height) == (200, 100)
    info = read_model_info(run / "model.safetensors")
    info["llm_fingerprint"] = {**info["llm_fingerprint"], "sha256": "0" * 20}
    with pytest.raises(CheckpointError, match="trained on another language model"):
        build_vlm_from_info(info)
    info["llm_fingerprint"]["config"] = {**info["llm_fingerprint"]["config"], "hidden_size": 7}
    with pytest.raises(CheckpointError, match="hidden_size"):
        build_vlm_from_info(info)


def test_missing_extra_is_one_line_before_any_work(tmp_path):
    src = str(Path(__file__).resolve().parents[1] / "src")
    prog = textwrap.dedent(f"""
        import os, sys, tempfile
        sys.path.insert(0, {src!r})
        stubs = tempfile.mkdtemp()
        os.makedirs(os.path.join(stubs, "peft"))
        open(os.path.join(stubs, "peft", "__init__.py"), "w").write("raise ModuleNotFoundError('No module named peft')")
        sys.path.insert(0, stubs)
        os.environ["FRUGALVISION_CACHE"] = {str(tmp_path / "cache")!r}
        import frugalvision as fv
        assert "transformers" not in sys.modules and "peft" not in sys.modules, "import frugalvision loaded them"
        fv.vlm
        assert "transformers" not in sys.modules, "fv.vlm imported transformers"
        from frugalvision.cli import main
        print("RC", main(["vlm", "train", "out={tmp_path / 'run'}"]))
        print("RC", main(["ask", "no.png", "hi"]))
    """)
    res = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["RC", "1", "RC", "1"]
    assert res.stderr.count('pip install "frugalvision[vlm]"') == 2 and "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_minigpt4_on_a_random_llm_with_the_detector_baseline(tmp_path, capsys):
    from frugalvision.detect.yolov6 import create_detector
    from frugalvision.language.instructions import KIND_PHRASES

    det = tmp_path / "detector.safetensors"
    classes = list(KIND_PHRASES)
    save_model_file(create_detector("yolov6_test", num_classes=len(classes)), det, "detector", "yolov6_test",
                    model_kwargs={"num_classes": len(classes)}, classes=classes, img_size=128, tile=128, overlap=64,
                    conf_thres=0.25, iou_thres=0.65, max_det=300)
    out = tmp_path / "v4"
    argv = [*TINY, "arch=minigpt4", "llm_init=random", "lora=false", "num_queries=4", "steps=1",
            "stages=align:caption+vqa,mixed:all", "tasks=[caption,vqa,refer]", "limit_test=2", f"out={out}",
            f"baseline_detector={det}", "baseline_threshold=count"]
    assert main(["vlm", "train", *argv]) == 0
    info = read_model_info(out / "model.safetensors")
    assert info["name"] == "minigpt4" and info["llm_init"] == "random" and info["lora"] is None
    assert info["visual_tokens"] == 4 and info["tasks"] == ["caption", "vqa", "refer"]
    assert {n.split(".")[0] for n in tensor_names(out / "model.safetensors")} == {"qformer", "llama_proj",
                                                                                   "ln_vision", "visual"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["scores"]["inspection"]) == {"VLM", "detector + templates"}
    assert "yolov6_test" in metrics["baseline"] and "detector + templates" in (out / "metrics.md").read_text()
    assert "counts, captions and grounding at score >=" in metrics["baseline"]  # the threshold set on training counts
    assert metrics["tasks"] == ["caption", "vqa", "refer"]


def test_count_threshold_moves_only_the_answers_that_count(monkeypatch):
    import frugalvision.pipelines.vlm as pv
    import frugalvision.weights as fw
    from frugalvision.language.instructions import Instruction

    def inst(key, task, answer, qtype="", label="crack"):
        return Instruction(key, None, 100, 100, task, f"[{task}] q", answer, qtype=qtype, label=label,
                           source="inspection")

    # one confident crack and a low-scoring second one: 0.25 counts two, the training counts say one
    preds = {k: ([[10, 10, 30, 30], [60, 60, 80, 80]], ["crack", "crack"], [0.9, 0.3]) for k in ("t.png", "a.png")}
    monkeypatch.setattr(fw, "load_model_file", lambda path: (None, {"kind": "detector", "classes": ["crack"],
                                                                    "conf_thres": 0.25, "img_size": 64}))
    monkeypatch.setattr(pv, "_detect", lambda det, info, insts, device, progress: preds)
    test = [inst("t.png", "vqa", "1", "count", ""), inst("t.png", "detection", "", label="crack")]
    file_answers, _ = pv.detector_answers("d", test)
    answers, note = pv.detector_answers("d", test, calibrate=[inst("a.png", "vqa", "1", "count", "")])
    assert file_answers[0] == "2" and answers[0] == "1"  # the count moved to the calibrated threshold (0.35)
    assert answers[1] == file_answers[1] and answers[1].count("{") == 2  # the boxes kept the file's
    assert "score >= 0.35" in note and "MAE 0.00" in note
    with pytest.raises(pv.DataError, match="no count question"):
        pv.detector_answers("d", test, calibrate=[inst("a.png", "detection", "", label="crack")])


def test_visual_encoder_from_a_detector_backbone(tmp_path: Path) -> None:
    """A detector model file gives its backbone to the VLM's visual encoder, exactly; another backbone is refused."""
    from frugalvision.detect.yolov6 import create_detector
    from frugalvision.errors import ConfigError
    from frugalvision.language.visual import FeatureLevel
    from frugalvision.weights import save_model_file

    det = create_detector("yolov6_test", num_classes=2).eval()
    path = save_model_file(det, tmp_path / "det.safetensors", "detector", "yolov6_test", {"num_classes": 2},
                           classes=["a", "b"], img_size=64, tile=64)
    enc = FeatureLevel("test_efficientrep", stride=16).eval()
    before = enc(torch.ones(1, 3, 64, 64))
    enc.load_classifier(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = det.backbone(x)[2]  # strides 4, 8, 16, 32: the stride-16 map
        got = enc(x)
    assert got.shape == want.shape and not torch.equal(enc(torch.ones(1, 3, 64, 64)), before)
    torch.testing.assert_close(got, want)
    assert enc.mean == [0.0, 0.0, 0.0] and enc.std == [1.0, 1.0, 1.0]  # YOLOv6 reads pixels in [0, 1]
    with pytest.raises(ConfigError, match="test_efficientrep"):
        FeatureLevel("test_resnet", stride=16).load_classifier(path)

    # a VLM on that encoder keeps the detector's numerics through its model file
    from frugalvision.language.vlm_file import VLMSpec, build_vlm, load_vlm, save_vlm

    vlm = build_vlm(VLMSpec(llm="tiny", visual="test_efficientrep", img_size=64, lora_r=4), visual_weights=path)
    save_vlm(vlm, tmp_path / "vlm.safetensors")
    back = load_vlm(tmp_path / "vlm.safetensors")
    assert back.mean == [0.0, 0.0, 0.0] and back.visual.bn_eps == 1e-3
    with torch.no_grad():
        torch.testing.assert_close(back.visual(x), want)
