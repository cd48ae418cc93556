"""Learned synthetic defects: a small class-conditional diffusion model trained on the few real defects.

In the spirit of Defect-Gen: the model learns the joint distribution of a defect's *appearance and shape* from a
handful of real defective images, then paints new defects into defect-free images and returns their masks.

* Data: windows of ``crop`` pixels centred near each real defect (randomly shifted, with all 8 flips/quarter
  turns), so a few dozen defects give thousands of distinct training windows.
* Model: diffusers' ``UNet2DModel`` (or any module with the same call signature) predicting the noise of a
  4-channel sample (RGB in [-1, 1] + mask in {-1, 1}), conditioned on the defect kind (class embedding) and on the
  window's *surface* (a heavily blurred copy of the window, concatenated as 3 extra input channels), so the
  generated defect matches the surface it is painted on.
* Sampling: DDIM with ``sample_steps`` steps. The generated mask (threshold 0) decides where the generated RGB
  replaces the clean image (a 1-pixel feathered edge); every pixel outside the returned mask is the clean image's
  own, so the mask is exactly the changed region.

Example:
    >>> cfg = DefectDiffusionConfig(steps=2, crop=16, channels=(16, 16), sample_steps=2)
    >>> rng = np.random.default_rng(0)
    >>> img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    >>> mask = np.zeros((32, 32), bool); mask[10:16, 10:20] = True
    >>> gen = DefectDiffusion(cfg)
    >>> _ = gen.fit([img], [mask], [0], progress=False)
    >>> new, m = gen.inpaint(img, kind=0, rng=rng)
    >>> new.shape, m.shape, bool((new[~m] == img[~m]).all())
    ((32, 32, 3), (32, 32), True)
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from ..._deps import require
from ...errors import DataError
from ...utils.filters import gaussian_blur, gaussian_kernel1d

__all__ = ["DefectDiffusion", "DefectDiffusionConfig"]


@dataclass
class DefectDiffusionConfig:
    """Settings of the learned defect generator.

    Attributes:
        crop: Side of the square windows the model learns and paints (pixels, multiple of 4).
        channels: UNet widths per resolution level (one level per entry).
        steps: Training steps (AdamW, cosine decay).
        batch_size: Windows per training step.
        lr: Peak learning rate.
        timesteps: Diffusion steps of the training noise schedule.
        sample_steps: DDIM steps when generating.
        context_sigma: Gaussian blur (pixels) of the surface context given to the model.
        min_area: Generated masks smaller than this many pixels are redrawn (up to ``retries`` times).
        retries: Attempts per defect before giving up with the largest mask drawn.
        device: ``cpu``, ``cuda`` or ``auto``.
        seed: Seed of initialisation, training windows and noise.
    """

    crop: int = 32
    channels: tuple[int, ...] = (16, 32, 64)
    steps: int = 800
    batch_size: int = 16
    lr: float = 1e-3
    timesteps: int = 1000
    sample_steps: int = 25
    context_sigma: float = 4.0
    min_area: int = 12
    retries: int = 4
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        levels = len(self.channels)
        if self.crop % (2 ** (levels - 1)) or self.crop < 8:
            raise ValueError(f"crop={self.crop} must be >= 8 and divisible by 2**(levels-1)={2 ** (levels - 1)}")
        if self.steps < 1 or self.sample_steps < 1 or self.batch_size < 1:
            raise ValueError("steps, sample_steps and batch_size must be positive")


def _to_unit(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 127.5 - 1


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``(B, C, H, W)`` with reflect padding, radius ``max(1, ceil(3 sigma))``.

    The kernel is computed in the input's dtype on its device (as this generator always has), so trained
    generators keep their numbers.
    """
    k = gaussian_kernel1d(sigma, radius=max(1, math.ceil(3 * sigma)), dtype=x.dtype, device=x.device,
                          compute_dtype=x.dtype)
    return gaussian_blur(x, k, padding="reflect")


class DefectDiffusion:
    """Train on a few real defects, then inpaint new ones (see the module docstring).

    Args:
        config: Generator settings.
        model: Optional denoiser ``model(x, t, class_labels=...) -> .sample`` with 7 input and 4 output channels;
            defaults to a small diffusers ``UNet2DModel``.
    """

    def __init__(self, config: DefectDiffusionConfig | None = None, model: torch.nn.Module | None = None) -> None:
        self.config = config or DefectDiffusionConfig()
        self.model = model
        self.num_kinds = 0
        self._windows: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        cfg = self.config
        if cfg.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(cfg.device)

    # ------------------------------------------------------------------ model
    def _build(self, num_kinds: int) -> torch.nn.Module:
        diffusers = require("diffusers", "the learned defect generator", extra="diffusion")
        c = self.config.channels
        return diffusers.UNet2DModel(
            sample_size=self.config.crop, in_channels=7, out_channels=4, block_out_channels=c, layers_per_block=1,
            down_block_types=("DownBlock2D",) * (len(c) - 1) + ("AttnDownBlock2D",),
            up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (len(c) - 1),
            norm_num_groups=min(8, c[0]), attention_head_dim=8, num_class_embeds=num_kinds)

    def _schedulers(self) -> tuple[Any, Any]:
        diffusers = require("diffusers", "the learned defect generator", extra="diffusion")
        kw = {"num_train_timesteps": self.config.timesteps, "beta_schedule": "squaredcos_cap_v2"}
        return diffusers.DDPMScheduler(**kw), diffusers.DDIMScheduler(**kw, clip_sample=True)

    # ------------------------------------------------------------------ data
    def _sample_windows(self, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` random training windows: target ``(n, 4, c, c)``, context ``(n, 3, c, c)``, kinds ``(n,)``."""
        c = self.config.crop
        xs, ks = [], []
        for _ in range(n):
            img, mask, kind = self._windows[int(torch.randint(len(self._windows), (), generator=gen))]
            ys, xs_ = torch.nonzero(mask[0] > 0, as_tuple=True)
            j = int(torch.randint(len(ys), (), generator=gen))  # centre the window near a random defect pixel
            h, w = mask.shape[-2:]
            cy = int(ys[j]) + int(torch.randint(-c // 4, c // 4 + 1, (), generator=gen))
            cx = int(xs_[j]) + int(torch.randint(-c // 4, c // 4 + 1, (), generator=gen))
            y0 = min(max(cy - c // 2, 0), h - c)
            x0 = min(max(cx - c // 2, 0), w - c)
            win = torch.cat([img, mask * 2 - 1])[:, y0 : y0 + c, x0 : x0 + c]
            d = int(torch.randint(8, (), generator=gen))
            win = win.rot90(d % 4, (-2, -1))
            xs.append(win.flip(-1) if d >= 4 else win)
            ks.append(kind)
        x = torch.stack(xs)
        return x, _blur(x[:, :3], self.config.context_sigma), torch.tensor(ks)

    # ------------------------------------------------------------------ training
    def fit(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], kinds: Sequence[int],
            progress: bool = True) -> dict[str, float]:
        """Train the denoiser on real defective images.

        Args:
            images: ``(H, W, 3)`` uint8 defective images.
            masks: ``(H, W)`` boolean defect masks, one per image.
            kinds: Defect kind index of each image (``0 .. K-1``).
            progress: Show a progress bar.

        Returns:
            ``{"steps", "final_loss", "windows", "params"}``.
        """
        from tqdm.auto import tqdm

        cfg = self.config
        if not (len(images) == len(masks) == len(kinds)) or not images:
            raise DataError(f"need the same non-zero number of images, masks and kinds, got {len(images)}, "
                            f"{len(masks)}, {len(kinds)}")
        self._windows = []
        for i, (img, m, k) in enumerate(zip(images, masks, kinds, strict=True)):
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8 or m.shape != img.shape[:2]:
                raise DataError(f"training defect {i}: expected an (H, W, 3) uint8 image and an (H, W) mask, got "
                                f"{img.shape} {img.dtype} and {m.shape}")
            if min(img.shape[:2]) < cfg.crop:
                raise DataError(f"training defect {i}: image {img.shape[:2]} is smaller than crop={cfg.crop}")
            if not m.any():
                raise DataError(f"training defect {i}: its mask is empty")
            self._windows.append((_to_unit(img), torch.from_numpy(m.astype(np.float32))[None], int(k)))
        self.num_kinds = max(kinds) + 1
        torch.manual_seed(cfg.seed)
        if self.model is None:
            self.model = self._build(self.num_kinds)
        model = self.model.to(self.device).train()
        ddpm, _ = self._schedulers()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.05)
        gen = torch.Generator().manual_seed(cfg.seed)
        ema = None
        t0 = time.perf_counter()
        bar = tqdm(range(cfg.steps), desc="train defect diffusion", disable=not progress, dynamic_ncols=True)
        for _ in bar:
            x0, ctx, k = self._sample_windows(gen, cfg.batch_size)
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(cfg.timesteps, (x0.shape[0],), generator=gen)
            xt = ddpm.add_noise(x0, noise, t)
            inp = torch.cat([xt, ctx], 1).to(self.device)
            pred = model(inp, t.to(self.device), class_labels=k.to(self.device)).sample
            loss = F.mse_loss(pred, noise.to(self.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            value = float(loss.detach())
            ema = value if ema is None else 0.98 * ema + 0.02 * value
            bar.set_postfix(loss=f"{ema:.4f}")
        bar.close()
        model.eval()
        return {"steps": cfg.steps, "final_loss": float(ema or 0.0), "windows": len(self._windows),
                "params": sum(p.numel() for p in model.parameters()), "train_loop_s": time.perf_counter() - t0}

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def sample(self, context: torch.Tensor, kinds: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Generate windows ``(B, 4, c, c)`` (RGB and mask in [-1, 1]) for surface windows ``context`` in [-1, 1]."""
        if self.model is None:
            raise RuntimeError("the generator is not trained: call fit() first")
        _, ddim = self._schedulers()
        ddim.set_timesteps(self.config.sample_steps)
        ctx = _blur(context, self.config.context_sigma).to(self.device)
        c = self.config.crop
        x = torch.randn((context.shape[0], 4, c, c), generator=generator).to(self.device)
        for t in ddim.timesteps:
            eps = self.model(torch.cat([x, ctx], 1), t.to(self.device).expand(x.shape[0]),
                             class_labels=kinds.to(self.device)).sample
            x = ddim.step(eps, t, x).prev_sample
        return x.clamp(-1, 1).cpu()

    def inpaint(self, image: np.ndarray, kind: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Paint one new defect of ``kind`` into a clean ``(H, W, 3)`` uint8 image at a random place.

        Returns:
            The new image and its boolean defect mask (every pixel outside it is unchanged).
        """
        return self.inpaint_many([image], [kind], rng)[0]

    def inpaint_many(self, images: Sequence[np.ndarray], kinds: Sequence[int], rng: np.random.Generator,
                     batch_size: int = 64) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`inpaint` for many images, sampled in batches (``retries`` candidate windows per image).

        Of each image's candidates (random positions), the first whose mask has at least ``min_area`` pixels is
        kept, else the largest.
        """
        c, r = self.config.crop, self.config.retries
        if len(images) != len(kinds):
            raise ValueError(f"got {len(images)} images but {len(kinds)} kinds")
        jobs = []  # (image index, y0, x0) per candidate
        for i, (image, kind) in enumerate(zip(images, kinds, strict=True)):
            h, w = image.shape[:2]
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(h, w) < c:
                raise DataError(f"inpaint needs (H, W, 3) uint8 images of at least {c} px, got {image.shape} "
                                f"{image.dtype} (image {i})")
            if not 0 <= kind < self.num_kinds:
                raise ValueError(f"kind {kind} is out of range: the generator was trained on {self.num_kinds} kinds")
            jobs += [(i, int(rng.integers(h - c + 1)), int(rng.integers(w - c + 1))) for _ in range(r)]
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        outs = []
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            windows = torch.stack([_to_unit(images[i][y : y + c, x : x + c]) for i, y, x in chunk])
            outs.append(self.sample(windows, torch.tensor([kinds[i] for i, _, _ in chunk]), gen))
        samples = torch.cat(outs) if outs else torch.zeros(0, 4, c, c)
        results = []
        for i, image in enumerate(images):
            masks = [ndi.binary_opening((samples[j][3] > 0).numpy(), iterations=1) for j in range(i * r, (i + 1) * r)]
            cands = list(zip(masks, range(i * r, (i + 1) * r), strict=True))
            ok = [cm for cm in cands if cm[0].sum() >= self.config.min_area]
            m, j = ok[0] if ok else max(cands, key=lambda cm: cm[0].sum())
            _, y0, x0 = jobs[j]
            rgb = ((samples[j][:3].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255)
            alpha = (ndi.gaussian_filter(m.astype(np.float32), 0.7) * m)[..., None]  # feathered inside, 0 outside
            clean = image[y0 : y0 + c, x0 : x0 + c].astype(np.float32)
            new = image.copy()
            new[y0 : y0 + c, x0 : x0 + c] = (clean * (1 - alpha) + rgb * alpha).round().astype(np.uint8)
            full = np.zeros(image.shape[:2], bool)
            full[y0 : y0 + c, x0 : x0 + c] = m
            results.append((new, full))
        return results
