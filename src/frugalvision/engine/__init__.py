"""Training engine: one loop, checkpoints, distributed data parallel."""

from .checkpoint import CheckpointState, load_checkpoint, save_checkpoint
from .distributed import DistInfo, init_distributed
from .schedule import WarmupCosine, build_scheduler
from .task import Accuracy, ClassificationTask, MeanLoss, Metric, Task, to_device
from .trainer import FitResult, TrainConfig, Trainer, build_optimizer, evaluate, resolve_device, seed_everything

__all__ = [
    "Accuracy",
    "CheckpointState",
    "ClassificationTask",
    "DistInfo",
    "FitResult",
    "MeanLoss",
    "Metric",
    "Task",
    "TrainConfig",
    "Trainer",
    "WarmupCosine",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "init_distributed",
    "load_checkpoint",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
    "to_device",
]
