"""Training and answering instructions with the engine: a dataset of (image, encoded example), a Task, batched answers.

:class:`InstructionDataset` turns :class:`~frugalvision.language.instructions.Instruction` s into ``(pixels,
EncodedExample)`` samples (the sample's window cropped, resized to the model's input, normalised; decoded images are
kept in memory, several instructions share one image). :class:`VLMTask` tells the engine's
:class:`~frugalvision.engine.Trainer` how to batch them (pixels stacked, token lists kept ragged: the model pads
them when it splices the image in) and that the loss is the model's own answer-token cross-entropy, so checkpoints,
exact resume, AMP and DDP come from the engine. :func:`answer_instructions` answers a list of instructions in
batches of one task (left-padded: a batch decodes exactly as its examples one by one).
"""

from __future__ import annotations

import random
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..engine.task import Task
from ..errors import ConfigError
from .instructions import Instruction
from .prompts import EncodedExample, encode_example
from .vlm_base import VisionLanguageModel
from .vlm_file import MAX_NEW_TOKENS, image_tensor, read_image

__all__ = ["InstructionDataset", "VLMTask", "answer_instructions", "balance_tasks", "limit_per_task"]


class _ImageCache:
    """Decoded, cropped, resized and normalised samples by key (an LRU of ``size`` entries)."""

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float], size: int = 4096) -> None:
        self.img_size, self.mean, self.std, self.size = img_size, list(mean), list(std), size
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, inst: Instruction) -> torch.Tensor:
        key = inst.key
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        x = image_tensor(sample_image(inst), self.img_size, self.mean, self.std)
        self.items[key] = x
        if len(self.items) > self.size:
            self.items.popitem(last=False)
        return x


def sample_image(inst: Instruction) -> Image.Image:
    """The RGB image of an instruction's sample (its window of the file, when it has one)."""
    img = read_image(inst.image)
    if inst.window is not None:
        img = img.crop(tuple(inst.window))
    return img


class InstructionDataset(Dataset):
    """Instructions as ``(pixels (3, S, S), EncodedExample)`` training samples.

    Args:
        instructions: The examples (prompt ``Instruction.prompt``, target ``Instruction.answer``).
        tokenizer: The LLM's tokenizer.
        img_size: Model input size.
        mean: Normalisation mean.
        std: Normalisation std.
        chat: Wrap prompts in the chat template (as the model does).
    """

    def __init__(self, instructions: Sequence[Instruction], tokenizer: Any, img_size: int, mean: Sequence[float],
                 std: Sequence[float], chat: bool = True) -> None:
        if not instructions:
            raise ConfigError("no training instructions (check data= and tasks=)")
        self.instructions = list(instructions)
        self.tokenizer, self.chat = tokenizer, chat
        self.images = _ImageCache(img_size, mean, std)
        self._encoded: dict[int, EncodedExample] = {}

    def __len__(self) -> int:
        return len(self.instructions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, EncodedExample]:
        inst = self.instructions[index]
        if index not in self._encoded:
            self._encoded[index] = encode_example(self.tokenizer, inst.prompt, inst.answer, self.chat)
        return self.images(inst), self._encoded[index]


class VLMTask(Task):
    """The engine's view of VLM training: ``batch = (pixels (B, 3, S, S), [EncodedExample] * B)``, loss = the model's.

    Example:
        >>> from frugalvision.language.llm import tiny_llm
        >>> from frugalvision.language.prompts import build_prompt
        >>> _, tok = tiny_llm()
        >>> ex = encode_example(tok, build_prompt("vqa", "defect?"), "yes")
        >>> pixels, examples = VLMTask().collate([(torch.zeros(3, 8, 8), ex), (torch.ones(3, 8, 8), ex)])
        >>> pixels.shape, len(examples)
        (torch.Size([2, 3, 8, 8]), 2)
    """

    main_metric = "loss"
    higher_is_better = False

    def forward(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """The mean answer-token cross-entropy of the batch."""
        pixels, examples = batch
        return model(pixels, examples)

    def loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """The model's loss (``forward`` already computed it)."""
        return outputs

    def batch_size(self, batch: Any) -> int:
        """Examples in the batch."""
        return int(batch[0].shape[0])

    def collate(self, samples: list[Any]) -> tuple[torch.Tensor, list[EncodedExample]]:
        """Stack the pixels; keep the examples as a list (the model pads them around the image embeddings)."""
        return torch.stack([s[0] for s in samples]), [s[1] for s in samples]


def limit_per_task(instructions: Sequence[Instruction], limit: int, seed: int = 0) -> list[Instruction]:
    """At most ``limit`` instructions of each task of each source, drawn with ``random.Random(seed)``, in order.

    Example:
        >>> insts = [Instruction("a.png", None, 8, 8, t, f"[{t}] x", "y") for t in ("vqa", "vqa", "vqa", "caption")]
        >>> [i.task for i in limit_per_task(insts, 2)]
        ['vqa', 'vqa', 'caption']
    """
    if limit <= 0:
        return list(instructions)
    by_task: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, inst in enumerate(instructions):
        by_task[(inst.source, inst.task)].append(i)
    rng = random.Random(seed)
    keep: set[int] = set()
    for task in sorted(by_task):
        idx = by_task[task]
        keep.update(idx if len(idx) <= limit else rng.sample(idx, limit))
    return [inst for i, inst in enumerate(instructions) if i in keep]


def balance_tasks(instructions: Sequence[Instruction], seed: int = 0) -> list[Instruction]:
    """Every task equally often: each task's instructions repeated (then drawn) up to the largest task's count.

    Example:
        >>> insts = [Instruction("a.png", None, 8, 8, t, f"[{t}] x", "y") for t in ("vqa", "vqa", "vqa", "caption")]
        >>> sorted(i.task for i in balance_tasks(insts))
        ['caption', 'caption', 'caption', 'vqa', 'vqa', 'vqa']
    """
    by_task: dict[str, list[Instruction]] = defaultdict(list)
    for inst in instructions:
        by_task[inst.task].append(inst)
    if not by_task:
        return []
    n = max(len(v) for v in by_task.values())
    rng = random.Random(seed)
    out: list[Instruction] = []
    for task in sorted(by_task):
        items = by_task[task]
        reps, rest = divmod(n, len(items))
        out += items * reps + rng.sample(items, rest)
    return out


@torch.no_grad()
def answer_instructions(model: VisionLanguageModel, instructions: Sequence[Instruction], batch_size: int = 8,
                        max_new_tokens: int | None = None, device: str | torch.device | None = None,
                        progress: bool = False) -> list[str]:
    """Greedy answers of the model to each instruction (batched by task; the answers keep the input order).

    Args:
        model: A VLM with ``spec``, ``mean`` and ``std`` (:func:`~frugalvision.language.vlm_file.build_vlm`).
        instructions: The instructions.
        batch_size: Instructions per generation batch.
        max_new_tokens: Most new tokens for every task; per task when unset
            (:data:`~frugalvision.language.vlm_file.MAX_NEW_TOKENS`).
        device: Where the model runs (its current device when unset).
        progress: Show a progress bar.
    """
    if device is not None:
        model.to(device)
    model.eval()
    spec = model.spec  # type: ignore[attr-defined]
    images = _ImageCache(spec.img_size, model.mean, model.std, size=256)  # type: ignore[arg-type]
    order = sorted(range(len(instructions)), key=lambda i: (instructions[i].task, i))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and instructions[batches[-1][0]].task == instructions[i].task:
            batches[-1].append(i)
        else:
            batches.append([i])
    answers: list[str] = [""] * len(instructions)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(instructions), desc="answer", dynamic_ncols=True, leave=False)
    try:
        for b in batches:
            task = instructions[b[0]].task
            pixels = torch.stack([images(instructions[i]) for i in b])
            out = model.generate(pixels, [instructions[i].prompt for i in b],
                                 max_new_tokens=max_new_tokens or MAX_NEW_TOKENS[task])
            for i, a in zip(b, out, strict=True):
                answers[i] = a
            if bar is not None:
                bar.update(len(b))
    finally:
        if bar is not None:
            bar.close()
    return answers
