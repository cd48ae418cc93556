"""Knowledge distillation as an engine :class:`~frugalvision.engine.task.Task`: logits + intermediate features.

The student is trained on ``alpha_ce * CE(labels) + alpha_kd * T^2 * KL(teacher_T || student_T) +
alpha_feat * mean_l MSE(student_l, teacher_l)``, where ``l`` runs over named modules whose outputs are matched
(e.g. every transformer block). The teacher is frozen and runs in eval mode without gradients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .task import Accuracy, MeanLoss, Metric, Task

__all__ = ["DistillOutput", "DistillationTask", "kd_loss"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hinton's logit distillation: ``T^2 * KL(softmax(t / T) || softmax(s / T))``, batch mean.

    Example:
        >>> z = torch.randn(4, 5)
        >>> float(kd_loss(z, z)) < 1e-6, float(kd_loss(z, -z)) > 0
        (True, True)
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * t * t


@dataclass
class DistillOutput:
    """Student and teacher outputs of one batch (and the loss terms once computed)."""

    logits: torch.Tensor
    teacher_logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


class _StudentAccuracy(Accuracy):
    def update(self, outputs: Any, batch: Any, loss: torch.Tensor | None = None) -> None:
        super().update(outputs.logits, batch, loss)


class _TermMeans(Metric):
    """Sample-weighted means of each loss term."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        super().__init__()
        self.state = {"sum": torch.zeros(len(self.names), dtype=torch.float64),
                      "count": torch.zeros(1, dtype=torch.float64)}

    def update(self, outputs: Any, batch: Any, loss: torch.Tensor | None = None) -> None:
        n = outputs.logits.shape[0]
        for i, k in enumerate(self.names):
            if k in outputs.terms:
                self.state["sum"][i] += float(outputs.terms[k].detach()) * n
        self.state["count"] += n

    def compute(self) -> dict[str, float]:
        c = max(float(self.state["count"]), 1.0)
        return {k: float(self.state["sum"][i]) / c for i, k in enumerate(self.names)}


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _as_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot match a module output of type {type(out).__name__}; give modules returning tensors")


class DistillationTask(Task):
    """Train a student to match a frozen teacher's logits and intermediate features (batch ``(images, labels)``).

    Args:
        teacher: The reference model (frozen, eval mode; moved to the batch's device on first use).
        features: Module names whose outputs are matched with MSE: a list of names present in both models,
            or a mapping ``{student_name: teacher_name}``. Empty: logits only.
        alpha_ce: Weight of the label cross-entropy.
        alpha_kd: Weight of the logit distillation.
        alpha_feat: Weight of the mean feature MSE.
        temperature: Softmax temperature of the logit distillation.
        label_smoothing: Label smoothing of the cross-entropy.

    Example:
        >>> s, t = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3)), nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
        >>> task = DistillationTask(t, features=["0"])
        >>> batch = (torch.randn(5, 4), torch.randint(0, 3, (5,)))
        >>> out = task.forward(s, batch); _ = task.loss(out, batch); sorted(out.terms)
        ['loss_ce', 'loss_feat', 'loss_kd']
    """

    main_metric = "acc1"
    higher_is_better = True

    def __init__(self, teacher: nn.Module, features: Sequence[str] | Mapping[str, str] = (), alpha_ce: float = 0.5,
                 alpha_kd: float = 1.0, alpha_feat: float = 1.0, temperature: float = 2.0,
                 label_smoothing: float = 0.0) -> None:
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        if min(alpha_ce, alpha_kd, alpha_feat) < 0 or alpha_ce + alpha_kd + alpha_feat == 0:
            raise ConfigError("loss weights alpha_ce, alpha_kd, alpha_feat must be >= 0 and not all 0")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.pairs = dict(features) if isinstance(features, Mapping) else {n: n for n in features}
        missing = [t for t in self.pairs.values() if t not in dict(teacher.named_modules())]
        if missing:
            raise ConfigError(f"teacher has no modules {missing}")
        self.alpha_ce, self.alpha_kd, self.alpha_feat = alpha_ce, alpha_kd, alpha_feat
        self.temperature = temperature
        self.label_smoothing = label_smoothing

    @staticmethod
    def _run(model: nn.Module, x: torch.Tensor, names: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        modules = dict(_unwrap(model).named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ConfigError(f"{type(_unwrap(model)).__name__} has no modules {missing} to distil features from")
        feats: dict[str, torch.Tensor] = {}
        hooks = [modules[n].register_forward_hook(lambda m, a, o, n=n: feats.__setitem__(n, _as_tensor(o)))
                 for n in names]
        try:
            logits = model(x)
        finally:
            for h in hooks:
                h.remove()
        return logits, feats

    def forward(self, model: nn.Module, batch: Any) -> DistillOutput:
        """Run student (with gradients) and teacher (without) and collect the matched features."""
        x = batch[0]
        ref = next(self.teacher.parameters(), None)
        if ref is not None and ref.device != x.device:
            self.teacher.to(x.device)
        self.teacher.eval()
        logits, feats = self._run(model, x, list(self.pairs))
        with torch.no_grad():
            t_logits, t_feats = self._run(self.teacher, x, list(self.pairs.values()))
        return DistillOutput(logits, t_logits, feats, {s: t_feats[t] for s, t in self.pairs.items()})

    def loss(self, outputs: DistillOutput, batch: Any) -> torch.Tensor:
        """Weighted sum of the three terms (stored in ``outputs.terms``)."""
        terms: dict[str, torch.Tensor] = {
            "loss_ce": F.cross_entropy(outputs.logits.float(), batch[1], label_smoothing=self.label_smoothing),
            "loss_kd": kd_loss(outputs.logits, outputs.teacher_logits, self.temperature),
        }
        if self.pairs:
            mse = [F.mse_loss(outputs.features[n].float(), outputs.teacher_features[n].float()) for n in self.pairs]
            terms["loss_feat"] = torch.stack(mse).mean()
        outputs.terms = terms
        total = self.alpha_ce * terms["loss_ce"] + self.alpha_kd * terms["loss_kd"]
        if "loss_feat" in terms:
            total = total + self.alpha_feat * terms["loss_feat"]
        return total

    def metrics(self) -> list[Metric]:
        """Mean total loss, each term's mean, and the student's top-1/top-5 accuracy."""
        names = ["loss_ce", "loss_kd"] + (["loss_feat"] if self.pairs else [])
        return [MeanLoss(), _TermMeans(names), _StudentAccuracy((1, 5))]
