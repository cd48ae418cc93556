"""What the engine trains: a :class:`Task` says how to run a model on a batch, the loss and the metrics.

The engine never knows about a specific architecture or data type; classification is the default task and
later features (segmentation, detection, distillation) supply their own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

from .distributed import all_reduce_sum

__all__ = ["Accuracy", "ClassificationTask", "MeanLoss", "Metric", "Task", "to_device"]


def to_device(batch: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """Move tensors nested in tuples, lists and dicts to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device, non_blocking) for v in batch))
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    return batch


class Metric:
    """A metric accumulated as summed tensors, so distributed evaluation only needs an all-reduce.

    Subclasses register their accumulators in ``self.state`` and implement :meth:`update` and :meth:`compute`.
    """

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        """Zero the accumulators."""
        for k in self.state:
            self.state[k] = torch.zeros_like(self.state[k])

    def update(self, outputs: Any, batch: Any, loss: torch.Tensor | None = None) -> None:
        """Accumulate one batch."""
        raise NotImplementedError

    def sync(self) -> None:
        """Sum the accumulators over distributed processes."""
        for v in self.state.values():
            all_reduce_sum(v)

    def compute(self) -> dict[str, float]:
        """Return the metric values."""
        raise NotImplementedError


class Accuracy(Metric):
    """Top-k accuracy in percent for logits ``(N, C)`` against integer targets ``(N,)``.

    Example:
        >>> m = Accuracy(topk=(1,)); m.update(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), (None, torch.tensor([1, 1])))
        >>> m.compute()
        {'acc1': 50.0}
    """

    def __init__(self, topk: Sequence[int] = (1,)) -> None:
        self.topk = tuple(topk)
        super().__init__()
        self.state = {"correct": torch.zeros(len(self.topk), dtype=torch.float64),
                      "count": torch.zeros(1, dtype=torch.float64)}

    def update(self, outputs: Any, batch: Any, loss: torch.Tensor | None = None) -> None:
        """Count correct predictions of the batch."""
        logits, target = outputs.detach(), batch[1]
        k = min(max(self.topk), logits.shape[-1])
        pred = logits.topk(k, dim=-1).indices
        hit = pred.eq(target.view(-1, 1))
        for i, kk in enumerate(self.topk):
            self.state["correct"][i] += hit[:, : min(kk, k)].any(dim=1).sum().double().cpu()
        self.state["count"] += target.numel()

    def compute(self) -> dict[str, float]:
        """Percent correct for each k."""
        n = max(float(self.state["count"]), 1.0)
        return {f"acc{k}": float(self.state["correct"][i]) * 100.0 / n for i, k in enumerate(self.topk)}


class MeanLoss(Metric):
    """Sample-weighted mean of the loss over an evaluation."""

    def __init__(self) -> None:
        super().__init__()
        self.state = {"sum": torch.zeros(1, dtype=torch.float64), "count": torch.zeros(1, dtype=torch.float64)}

    def update(self, outputs: Any, batch: Any, loss: torch.Tensor | None = None) -> None:
        """Add ``loss`` weighted by the batch size."""
        if loss is not None:
            n = _batch_size(batch)
            self.state["sum"] += float(loss.detach()) * n
            self.state["count"] += n

    def compute(self) -> dict[str, float]:
        """The mean loss."""
        return {"loss": float(self.state["sum"]) / max(float(self.state["count"]), 1.0)}


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        return _batch_size(next(iter(batch.values())))
    return _batch_size(batch[0])


class Task:
    """How the engine runs a model on a batch, computes the loss and measures quality.

    Override :meth:`forward`, :meth:`loss` and :meth:`metrics` for a new kind of problem, and :meth:`collate` when
    samples do not stack (token lists of different lengths, boxes). ``main_metric`` names the value used to pick the
    best checkpoint; ``higher_is_better`` says in which direction.
    """

    main_metric: str = "loss"
    higher_is_better: bool = False

    def forward(self, model: nn.Module, batch: Any) -> Any:
        """Run the model on the inputs of a batch."""
        return model(batch[0])

    def loss(self, outputs: Any, batch: Any) -> torch.Tensor:
        """The scalar training loss."""
        raise NotImplementedError

    def metrics(self) -> list[Metric]:
        """Fresh metric accumulators for one evaluation."""
        return [MeanLoss()]

    def batch_size(self, batch: Any) -> int:
        """Number of samples in a batch."""
        return _batch_size(batch)

    def collate(self, samples: list[Any]) -> Any:
        """Join the samples of a batch (the data loader's ``collate_fn``): torch's ``default_collate``."""
        return default_collate(samples)


class ClassificationTask(Task):
    """Image classification: ``batch = (images, labels)``, cross-entropy loss, top-1/top-5 accuracy.

    Example:
        >>> t = ClassificationTask(); x = (torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
        >>> t.loss(torch.zeros(4, 3), x).item() > 0
        True
    """

    main_metric = "acc1"
    higher_is_better = True

    def __init__(self, label_smoothing: float = 0.0, topk: Sequence[int] = (1, 5)) -> None:
        self.label_smoothing = label_smoothing
        self.topk = tuple(topk)

    def loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """Cross-entropy with optional label smoothing."""
        return F.cross_entropy(outputs.float(), batch[1], label_smoothing=self.label_smoothing)

    def metrics(self) -> list[Metric]:
        """Mean loss and top-k accuracy."""
        return [MeanLoss(), Accuracy(self.topk)]
