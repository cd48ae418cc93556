"""``frugalvision <command>``: a thin layer over the Python API.

Every command is configured by a dataclass; values come from its defaults, then ``--config file.yaml``,
then ``key=value`` overrides (``--key value`` and ``--flag`` work too). ``frugalvision <command> --help``
lists every key with its type, default and meaning. Bad arguments exit with code 2 and one line on stderr;
data and checkpoint problems exit with code 1 and one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import re
import shlex
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from .config import build_config
from .errors import ConfigError, FrugalVisionError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@dataclass
class _Command:
    name: str
    help: str
    config: type | None
    run: Callable[[Any, argparse.Namespace], int]
    positional: str | None = None  # config field filled by bare positional words
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None
    usage_words: str | None = None  # how the usage line shows the positional words (default: the field's name)


def _field_docs(cls: type) -> dict[str, str]:
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        text = klass.__doc__ or ""
        m = re.search(r"Attributes:\n(.*?)(\n\s*\n|\Z)", text, re.S)
        if not m:
            continue
        current = None
        for line in m.group(1).splitlines():
            fm = re.match(r"\s{8}(\w+):\s*(.*)", line)
            if fm:
                current = fm.group(1)
                docs[current] = fm.group(2).strip()
            elif current and line.strip():
                docs[current] += " " + line.strip()
    return docs


def _config_help(cls: type) -> str:
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    lines = ["configuration keys (key=value, --key value, or in --config YAML):"]
    own = getattr(cls, "__annotations__", {})
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        tp = str(hints[f.name]).replace("typing.", "").replace("pathlib.", "").replace("<class '", "").replace("'>", "")
        lines.append(f"  {f.name} ({tp}, default {default!r})")
        if f.name in docs:
            lines.append(f"      {docs[f.name]}")
    return "\n".join(lines)


def _split_tokens(tokens: Sequence[str], cls: type, positional: str | None) -> tuple[list[str], list[str]]:
    """Turn leftover tokens into ``key=value`` overrides and bare positional words."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    overrides: list[str] = []
    words: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--"):
            key, eq, value = tok[2:].partition("=")
            key = key.replace("-", "_")
            if key not in fields:
                raise ConfigError(f"unknown option --{key.replace('_', '-')}; valid keys: {', '.join(fields)}")
            if not eq:
                if hints[key] is bool:
                    value = "true"
                elif i + 1 < len(tokens):
                    i += 1
                    value = tokens[i]
                else:
                    raise ConfigError(f"option --{key.replace('_', '-')} needs a value")
            overrides.append(f"{key}={value}")
        elif "=" in tok and re.match(r"^[A-Za-z_][\w.]*=", tok):
            overrides.append(tok)
        else:
            if positional is None:
                raise ConfigError(f"unexpected argument {tok!r}; give settings as key=value")
            words.append(tok)
        i += 1
    if words and positional is not None:
        tp = hints[positional]
        value = json.dumps(words) if typing.get_origin(tp) in (list, tuple) else words[0]
        if typing.get_origin(tp) not in (list, tuple) and len(words) > 1:
            raise ConfigError(f"expected one {positional}, got {' '.join(words)}")
        overrides.insert(0, f"{positional}={value}")
    return overrides, words


# --------------------------------------------------------------------------------------------- commands
def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _json_job(module: str, function: str, drop: tuple[str, ...] = (), status: str | None = None
              ) -> Callable[[Any, argparse.Namespace], int]:
    """A command that runs ``pipelines.<module>.<function>(cfg)`` and prints its result (JSON, or a listing).

    ``status``: the result key that says whether anything was processed (exit code 1 when inputs were given but
    none could be processed).
    """

    def run(cfg: Any, args: argparse.Namespace) -> int:
        job = getattr(importlib.import_module(f"{__package__}.pipelines.{module}"), function)
        res = job(cfg)
        if isinstance(res, str):  # a listing
            print(res)
        else:
            _print_json({k: v for k, v in res.items() if k not in drop} if isinstance(res, dict) else res)
        if status and isinstance(res, dict) and res.get("images") and not res.get(status):
            return 1
        return 0

    return run


def _run_bench(cfg: Any, args: argparse.Namespace) -> int:
    from .pipelines.bench import run_bench

    command = "frugalvision " + " ".join(shlex.quote(a) for a in args._argv)
    _, _, md = run_bench(cfg, command)
    print(md)
    return 0


def _run_demo(cfg: Any, args: argparse.Namespace) -> int:
    from .pipelines.demo import run_demo

    result = run_demo(cfg)
    print(f"report: {result['report_html']}")
    return 0


def _run_surgery(cfg: Any, args: argparse.Namespace) -> int:
    from .pipelines.surgery import run_surgery

    res = run_surgery(cfg)
    rep = res["report"]
    summary = {k: rep[k] for k in ("replaced", "base_ms", "predicted_ms", "measured_before_ms", "measured_after_ms")}
    _print_json({k: v for k, v in res.items() if k != "report"} | summary)
    return 0


def _run_ask(cfg: Any, args: argparse.Namespace) -> int:
    from .pipelines.vlm import run_ask

    res = run_ask(cfg)
    print(res["answer"] or "(empty answer)")
    if res.get("scores"):  # an image reader's answer: its class scores
        print("scores: " + ", ".join(f"{k} {v:.3g}" for k, v in res["scores"].items()), file=sys.stderr)
    if res.get("drawn"):
        n = len(res["boxes"])
        print(f"{n} box{'es' if n > 1 else ''} drawn in {res['drawn']}", file=sys.stderr)
    if res.get("not_drawn"):
        print(f"boxes not drawn: {res['not_drawn']}", file=sys.stderr)
    if res.get("unparseable"):
        print(f"the answer holds an unparseable box: {res['unparseable'][0]}", file=sys.stderr)
    return 0


def _run_chat(cfg: Any, args: argparse.Namespace) -> int:
    from .pipelines.vlm import run_chat

    run_chat(cfg)
    return 0


def _commands() -> list[_Command]:
    from .pipelines.adaptation import ProfileConfig
    from .pipelines.anomaly import AnomalyConfig
    from .pipelines.bench import BenchConfig
    from .pipelines.classification import ClassifyConfig
    from .pipelines.demo import DemoConfig
    from .pipelines.detection import DetectConfig
    from .pipelines.info import DataConfig, InfoConfig, ModelsConfig
    from .pipelines.inspection import SegmentConfig, SynthConfig
    from .pipelines.model_file import EvalConfig, ExportConfig, PredictConfig
    from .pipelines.seed import SEEDJobConfig
    from .pipelines.slime import SlimeJobConfig
    from .pipelines.surgery import SurgeryConfig
    from .pipelines.svg import SVGConfig
    from .pipelines.vlm import AskConfig, ChatConfig, VLMConfig

    return [
        _Command("demo", "run the main pipeline end to end on bundled real data", DemoConfig, _run_demo),
        _Command("segment", "train + evaluate a defect segmenter (few real + synthetic defects)", SegmentConfig,
                 _json_job("inspection", "train_segmenter", drop=("model", "test_dataset", "history"))),
        _Command("synth", "write synthetic defects (procedural or diffusion) in MVTec AD layout", SynthConfig,
                 _json_job("inspection", "synthesize")),
        _Command("predict", "run any model file on image files/folders, streaming", PredictConfig,
                 _json_job("model_file", "run_predict", status="predicted"), positional="images"),
        _Command("anomaly", "anomaly detection (PatchCore, AnomalyCLIP): fit | test | predict IMAGES | train",
                 AnomalyConfig, _json_job("anomaly", "run_anomaly", status="predicted"), positional="action"),
        _Command("detect", "object detection (YOLOv6) + Mask Frozen masks: train | test | predict IMAGES | export",
                 DetectConfig, _json_job("detection", "run_detect"), positional="action"),
        _Command("vlm", "grounded VQA (MiniGPT-v2 / MiniGPT-4 on SmolLM2): train | test", VLMConfig,
                 _json_job("vlm", "run_vlm"), positional="action"),
        _Command("ask", "ask a trained VLM about an image: ask IMAGE QUESTION (boxes drawn)", AskConfig, _run_ask,
                 positional="words", usage_words="IMAGE QUESTION..."),
        _Command("chat", "talk with a trained VLM about an image (questions from stdin)", ChatConfig, _run_chat,
                 positional="image", usage_words="IMAGE"),
        _Command("train", "train a classifier on a folder or bundled dataset", ClassifyConfig,
                 _json_job("classification", "train_classifier")),
        _Command("profile", "SubTuning profile: tune each block alone, plot it, pick the best few", ProfileConfig,
                 _json_job("adaptation", "run_profile")),
        _Command("eval", "evaluate any model file on a dataset split", EvalConfig, _json_job("model_file", "run_eval")),
        _Command("export", "export any model file to ONNX with a parity check", ExportConfig,
                 _json_job("model_file", "export_model_file")),
        _Command("bench", "benchmark models side by side (latency, throughput, FLOPs, memory, roofline)",
                 BenchConfig, _run_bench, positional="models"),
        _Command("data", "build the bundled real-image datasets", DataConfig, _json_job("info", "build_data"),
                 positional="name"),
        _Command("models", "list registered models", ModelsConfig, _json_job("info", "list_models"),
                 positional="pattern"),
        _Command("info", "versions, hardware and cache location", InfoConfig, _json_job("info", "describe")),
        _Command("surgery", "replace a ViT's costliest attention mixers to meet a latency budget, then distil",
                 SurgeryConfig, _run_surgery),
        _Command("slime", "one-shot segmentation from diffusion attention (SLiMe): fit IMAGE MASK... | predict IMAGES",
                 SlimeJobConfig, _json_job("slime", "run_slime", status="predicted"), positional="action"),
        _Command("svg", "images as compact SVG text for language models (+ renderings, fidelity CSV) | train | test "
                 "(classifiers reading the text, under test-time shifts)", SVGConfig,
                 _json_job("svg", "run_svg", status="written"), positional="images",
                 usage_words="IMAGES... | train | test"),
        _Command("seed", "SEED image tokens: train | encode IMAGES (→ codes) | decode TOKENS (→ embeddings, images) "
                 "| lm (an LM reads and draws codes) | draw CAPTIONS | pixels (the diffusion decoder)",
                 SEEDJobConfig, _json_job("seed", "run_seed"), positional="action",
                 usage_words="train | encode IMAGES... | decode TOKENS... | lm | draw CAPTIONS... | pixels"),
    ]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, _Command]]:
    """The top-level parser and the command table."""
    parser = _Parser(prog="frugalvision", description="Efficient vision: architectures, adaptation, inspection.",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="Run `frugalvision <command> --help` for a command's configuration keys.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"frugalvision {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    table = {}
    for cmd in _commands():
        desc = (cmd.config.__doc__ or cmd.help).strip().split("\n")[0] if cmd.config else cmd.help
        desc = re.sub(r":\w+:`~?(?:[\w]+\.)*(\w+)`", r"\1", desc)
        usage_pos = f" [{cmd.positional.upper()} ...]" if cmd.positional else ""
        usage_pos = f" {cmd.usage_words}" if cmd.usage_words else usage_pos
        p = sub.add_parser(
            cmd.name, help=cmd.help, description=desc, formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=_config_help(cmd.config) if cmd.config else None,
            usage=f"frugalvision {cmd.name}{usage_pos} [--config FILE] [key=value ...]",
        )
        p.add_argument("--config", metavar="FILE", help="YAML file of configuration keys")
        table[cmd.name] = cmd
    return parser, table


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``frugalvision`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, table = build_parser()
    if not argv:
        parser.print_help()
        return 2
    args, rest = parser.parse_known_args(argv)
    args._argv = argv
    cmd = table[args.command]
    try:
        overrides, _ = _split_tokens(rest, cmd.config, cmd.positional)
        cfg = build_config(cmd.config, args.config, overrides)
    except ConfigError as exc:
        print(f"frugalvision {cmd.name}: error: {exc}", file=sys.stderr)
        return 2
    try:
        return cmd.run(cfg, args)
    except ConfigError as exc:
        print(f"frugalvision {cmd.name}: error: {exc}", file=sys.stderr)
        return 2
    except FrugalVisionError as exc:
        print(f"frugalvision {cmd.name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"frugalvision {cmd.name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
