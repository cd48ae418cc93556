"""A small but complete training run used by the resume-after-kill and distributed tests.

It has every source of randomness the engine must reproduce: shuffled data order, random augmentation in the
dataset, dropout in the model, and the Adam/SGD state. Usage:
    python tiny_training.py OUT_DIR [--sleep S] [--resume] [--optimizer sgd] [--no-dropout] [--steps N]
Under torchrun it trains with DDP. Rank 0 writes OUT_DIR/final.safetensors.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import torch
from torch import nn
from torch.utils.data import Dataset

from frugalvision.engine import TrainConfig, Trainer, seed_everything
from frugalvision.weights import write_weights


class NoisyBlobs(Dataset):
    """Gaussian blobs with per-sample random noise and sign flips drawn from torch's RNG."""

    def __init__(self, n: int = 96, augment: bool = True) -> None:
        g = torch.Generator().manual_seed(1)
        self.y = torch.randint(0, 4, (n,), generator=g)
        self.x = torch.randn(n, 12, generator=g) + self.y[:, None].float()
        self.augment = augment

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x = self.x[i]
        if self.augment:
            x = x + 0.1 * torch.randn(12)
            if torch.rand(()) < 0.5:
                x = x.flip(0)
        return x, self.y[i]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--no-dropout", action="store_true")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    seed_everything(0)
    layers = [nn.Linear(12, 32), nn.GELU()] + ([] if a.no_dropout else [nn.Dropout(0.2)]) + [nn.Linear(32, 4)]
    model = nn.Sequential(*layers)
    cfg = TrainConfig(epochs=a.epochs, batch_size=16, lr=0.05 if a.optimizer == "sgd" else 1e-2, optimizer=a.optimizer,
                      warmup_epochs=1, grad_clip=5.0, output_dir=Path(a.out), ckpt_every=2, progress=False,
                      resume="auto" if a.resume else None, device="cpu", num_workers=a.workers, seed=7)
    callbacks = [lambda tr, step, logs: time.sleep(a.sleep)] if a.sleep else []
    trainer = Trainer(model, cfg, NoisyBlobs(augment=not a.no_augment), NoisyBlobs(32, augment=False),
                      callbacks=callbacks)
    trainer.fit()
    if trainer.dist.is_main:
        write_weights(Path(a.out) / "final.safetensors", model, metadata={"world_size": str(trainer.dist.world_size)})


if __name__ == "__main__":
    main()
