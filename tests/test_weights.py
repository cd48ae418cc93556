"""The one home of weights and model files: reading, writing, the fit check and model-file kinds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from frugalvision.errors import CheckpointError
from frugalvision.models import create_model, load_backbone_weights
from frugalvision.weights import (
    MODEL_KINDS,
    ModelKind,
    check_fit,
    load_model_file,
    load_weights,
    read_model_info,
    read_weights,
    register_model_kind,
    save_model_file,
    tensor_names,
    write_weights,
)


def test_fit_check_names_every_kind_of_mismatch_and_leaves_the_model_unchanged(tmp_path):
    src = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    sd = dict(src.state_dict())
    sd.pop("1.bias")
    sd["0.weight"] = torch.zeros(5, 4)
    sd["extra.weight"] = torch.zeros(1)
    path = write_weights(tmp_path / "bad.safetensors", sd)
    dst = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_weights(dst, path, what="the toy")
    msg = str(err.value)
    assert "bad.safetensors" in msg and "the toy" in msg
    assert "1 missing key (1.bias)" in msg and "1 unexpected key (extra.weight)" in msg
    assert "0.weight: file (5, 4) vs model (3, 4)" in msg
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_allowances_are_explicit_and_reported():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 5))  # "1." is the head, resized from 2 to 5 classes
    pre = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).state_dict()
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_weights(model, pre, source="pre")
    fit = load_weights(model, pre, source="pre", reinit=("1.",))
    assert fit.loaded == ["0.weight", "0.bias"] and fit.skipped == ["1.weight", "1.bias"]
    assert torch.equal(model[0].weight, pre["0.weight"])
    backbone = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(CheckpointError, match="2 unexpected keys"):
        load_weights(backbone, pre, source="pre")
    assert load_weights(backbone, pre, source="pre", allow_unused=True).summary() == {
        "loaded": 2, "unused": 2, "reinitialised": 0}
    with pytest.raises(CheckpointError, match="missing"):  # unused tensors allowed, missing ones never
        load_weights(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3)), {"0.weight": pre["0.weight"]}, source="x",
                     allow_unused=True)


def test_check_fit_accepts_shapes():
    assert check_fit({"a": (2, 3)}, {"a": torch.zeros(2, 3)}, "f").loaded == ["a"]
    with pytest.raises(CheckpointError, match=r"a: file \(3,\) vs model \(2, 3\)"):
        check_fit({"a": (2, 3)}, {"a": (3,)}, "f")


def test_reading_formats_and_refusals(tmp_path):
    m = nn.Linear(3, 2)
    sd = m.state_dict()
    st = write_weights(tmp_path / "w.safetensors", m, {"k": "v"})
    assert tensor_names(st) == ["bias", "weight"]
    assert read_weights(st, names=["weight"]).keys() == {"weight"}
    with pytest.raises(CheckpointError, match="has no tensor 'nope'"):
        read_weights(st, names=["nope"])
    pth = tmp_path / "w.pth"
    torch.save({"model": sd, "epoch": 1}, pth)
    assert all(torch.equal(read_weights(pth)[k], v) for k, v in sd.items())
    npy = tmp_path / "w.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(CheckpointError, match="NumPy"):
        read_weights(npy)
    txt = tmp_path / "w.txt"
    txt.write_text("hello")
    with pytest.raises(CheckpointError, match=r"w\.txt"):
        read_weights(txt)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_weights(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="folder"):
        read_weights(tmp_path)


def test_pickled_objects_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    p = tmp_path / "evil.pt"
    torch.save({"state_dict": nn.Linear(2, 2).state_dict(), "payload": Evil()}, p)
    with pytest.raises(CheckpointError, match="refusing"):
        read_weights(p)
    assert not marker.exists()


def test_write_is_atomic_and_shared_storage_is_split(tmp_path):
    lin = nn.Linear(2, 2)
    tied = {"a": lin.weight, "b": lin.weight}  # the same storage twice (tied weights)
    p = write_weights(tmp_path / "t.safetensors", tied)
    out = read_weights(p)
    assert torch.equal(out["a"], out["b"])
    assert [f.name for f in tmp_path.iterdir()] == ["t.safetensors"]


def test_model_file_round_trip_and_kind_registry(tmp_path):
    model = create_model("resnet10t", num_classes=3).eval()
    p = save_model_file(model, tmp_path / "m.safetensors", "classifier", "resnet10t", {"num_classes": 3},
                        classes=["a", "b", "c"], img_size=32)
    info = read_model_info(p)
    assert info["kind"] == "classifier" and info["classes"] == ["a", "b", "c"]
    loaded, _ = load_model_file(p)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match="unknown model-file kind"):
        save_model_file(model, tmp_path / "x.safetensors", "nonsense", "resnet10t")
    # a kind added later (detection, language) plugs in the same way
    register_model_kind(ModelKind("toy_test", "classification", lambda info: nn.Linear(2, info["model_kwargs"]["n"])))
    try:
        save_model_file(nn.Linear(2, 4), tmp_path / "toy.safetensors", "toy_test", "toy", {"n": 4})
        toy, info = load_model_file(tmp_path / "toy.safetensors")
        assert toy.out_features == 4 and info["kind"] == "toy_test"
    finally:
        MODEL_KINDS.pop("toy_test")
    with pytest.raises(CheckpointError, match=r"kind .toy_test.*does not know"):
        load_model_file(tmp_path / "toy.safetensors")


def test_model_file_whose_weights_do_not_fit_its_description(tmp_path):
    model = create_model("resnet10t", num_classes=3)
    p = tmp_path / "m.safetensors"
    save_model_file(model, p, "classifier", "resnet10t", {"num_classes": 4})  # the description lies
    with pytest.raises(CheckpointError, match=r"m\.safetensors do not fit its description.*fc\.weight"):
        load_model_file(p)


def test_plain_weights_are_not_a_model_file(tmp_path):
    p = write_weights(tmp_path / "w.safetensors", nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="no model description"):
        load_model_file(p)


def test_files_written_before_kinds_existed_still_load(tmp_path):
    model = create_model("resnet10t", num_classes=2).eval()
    header = {"name": "resnet10t", "model_kwargs": {"num_classes": 2}, "classes": ["a", "b"]}
    p = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(p),
              metadata={"frugalvision.model": json.dumps(header)})
    loaded, info = load_model_file(p)
    assert info["kind"] == "classifier" and isinstance(loaded, type(model))


def test_backbone_from_a_classifier_file(tmp_path):
    clf = create_model("resnet10t", num_classes=5)
    p = write_weights(tmp_path / "clf.safetensors", clf)
    import timm

    backbone = timm.create_model("resnet10t", features_only=True, pretrained=False)
    fit = load_backbone_weights(backbone, p)
    assert sorted(fit.unexpected) == ["fc.bias", "fc.weight"] and not fit.missing
    assert torch.equal(backbone.conv1[0].weight, clf.conv1[0].weight)
    other = timm.create_model("resnet18", features_only=True, pretrained=False)
    with pytest.raises(CheckpointError, match=r"clf\.safetensors do not fit"):
        load_backbone_weights(other, p)


@pytest.mark.parametrize("name", ["resnet10t", "test_efficientmod", "test_fastervit", "test_efficientrep"])
def test_every_backbone_tensor_comes_from_the_classifier(name):
    """timm's feature extractors rename keys three ways (``stages_0``, ``conv1.0`` kept, ``model.`` wrapper)."""
    import timm

    if not timm.is_model(name):
        pytest.skip(f"{name} is not registered")
    clf = create_model(name, num_classes=5)
    backbone = timm.create_model(name, features_only=True, pretrained=False)
    fit = load_backbone_weights(backbone, clf.state_dict())
    assert len(fit.loaded) == len(backbone.state_dict()) and not fit.missing
    params = dict(clf.named_parameters())
    shared = [k for k in fit.loaded if k in params or k.removeprefix("model.") in params]
    assert shared, "no key kept its name: the comparison below would test nothing"
    for k in shared:
        assert torch.equal(backbone.state_dict()[k], params.get(k, params.get(k.removeprefix("model."))))
