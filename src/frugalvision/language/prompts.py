"""MiniGPT-v2 prompts: task identifiers, the image placeholder, the chat template and training examples as token ids.

A MiniGPT-v2 instruction is ``<Img><ImageHere></Img> [task] instruction``; the official model wraps it in
LLaMA-2-chat's ``[INST] ... [/INST]`` and trains on the answer tokens only. Here the instruction is wrapped in the
tokenizer's own chat template (SmolLM2: ChatML), or in the official ``[INST] {} [/INST]`` when the tokenizer has
none. :func:`encode_example` splits the token ids around ``<ImageHere>`` so a model can insert the image embeddings
there (:class:`~frugalvision.language.vlm_base.VisionLanguageModel`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

__all__ = [
    "IMAGE_PLACEHOLDER",
    "IMAGE_PROMPT",
    "LLAMA2_TEMPLATE",
    "TASKS",
    "EncodedExample",
    "build_prompt",
    "chat_wrap",
    "encode_batch",
    "encode_conversation",
    "encode_example",
    "encode_prompt",
]

#: MiniGPT-v2's task identifiers (written ``[task]`` in the prompt).
TASKS = ("vqa", "caption", "refer", "identify", "grounding", "detection")
#: Where the image embeddings go.
IMAGE_PLACEHOLDER = "<ImageHere>"
#: The image part of every prompt.
IMAGE_PROMPT = "<Img><ImageHere></Img>"
#: The official prompt template (LLaMA-2-chat), used when a tokenizer has no chat template.
LLAMA2_TEMPLATE = "[INST] {} [/INST]"


def build_prompt(task: str, instruction: str) -> str:
    """A MiniGPT-v2 user prompt.

    Example:
        >>> build_prompt("refer", "the red car")
        '<Img><ImageHere></Img> [refer] the red car'
    """
    if task not in TASKS:
        raise ConfigError(f"unknown MiniGPT-v2 task {task!r}; the tasks are: {', '.join(TASKS)}")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ConfigError(f"the instruction of a [{task}] prompt is empty; give the question, expression or request "
                          f"(tasks: {', '.join(TASKS)})")
    return f"{IMAGE_PROMPT} [{task}] {instruction.strip()}"


def chat_wrap(tokenizer: Any, user_text: str) -> str:
    r"""``user_text`` as one user turn of the tokenizer's chat template, ending with the assistant's generation prompt.

    Tokenizers without a chat template get the official MiniGPT-v2 template ``[INST] {} [/INST]``.

    Example:
        >>> from frugalvision.language.llm import tiny_llm
        >>> _, tok = tiny_llm()
        >>> chat_wrap(tok, "hi")
        '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n'
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                             add_generation_prompt=True)
        return str(text)
    return LLAMA2_TEMPLATE.format(user_text)


@dataclass
class EncodedExample:
    """Token ids of one example split around the image.

    Attributes:
        before: Ids before ``<ImageHere>`` (chat header, ``<Img>``).
        after: Ids after it, up to and including the assistant's generation prompt.
        answer: Ids of the answer followed by the end-of-sequence id (empty for a prompt to generate from).
    """

    before: list[int]
    after: list[int]
    answer: list[int]

    def __len__(self) -> int:
        return len(self.before) + len(self.after) + len(self.answer)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_prompt(tokenizer: Any, prompt: str, chat: bool = True) -> EncodedExample:
    """The prompt part of :func:`encode_example` (``answer`` empty): what generation starts from."""
    if prompt.count(IMAGE_PLACEHOLDER) != 1:
        raise ConfigError(f"a prompt must hold {IMAGE_PLACEHOLDER} exactly once (it holds it "
                          f"{prompt.count(IMAGE_PLACEHOLDER)} times): {prompt!r}; build it with build_prompt()")
    text = chat_wrap(tokenizer, prompt) if chat else prompt
    head, tail = text.split(IMAGE_PLACEHOLDER)
    before = _ids(tokenizer, head)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if (not chat or not has_template) and getattr(tokenizer, "bos_token_id", None) is not None:
        before = [tokenizer.bos_token_id, *before]  # chat templates write their own begin-of-text token
    return EncodedExample(before, _ids(tokenizer, tail), [])


def encode_example(tokenizer: Any, prompt: str, answer: str, chat: bool = True) -> EncodedExample:
    r"""Token ids of a training example: the chat-wrapped prompt split at ``<ImageHere>``, then answer + eos.

    Args:
        tokenizer: The language model's tokenizer.
        prompt: A user prompt holding ``<ImageHere>`` once (:func:`build_prompt`).
        answer: The target text; the loss covers its tokens and the end-of-sequence token only.
        chat: Wrap the prompt in the chat template (:func:`chat_wrap`); ``False`` uses it as it is (after a
            begin-of-sequence token when the tokenizer has one).

    Example:
        >>> from frugalvision.language.llm import tiny_llm
        >>> _, tok = tiny_llm()
        >>> ex = encode_example(tok, build_prompt("vqa", "what?"), "cat")
        >>> tok.decode(ex.after), tok.decode(ex.answer)
        ('</Img> [vqa] what?<|im_end|>\n<|im_start|>assistant\n', 'cat<|im_end|>')
    """
    enc = encode_prompt(tokenizer, prompt, chat)
    if not isinstance(answer, str) or not answer.strip():
        raise ConfigError("an example's answer is empty; the model would learn nothing from it")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ConfigError("the tokenizer has no end-of-sequence token; the answers' end cannot be learnt")
    enc.answer = [*_ids(tokenizer, answer), int(eos)]
    return enc


def encode_batch(tokenizer: Any, prompts: Sequence[str], answers: Sequence[str],
                 chat: bool = True) -> list[EncodedExample]:
    """:func:`encode_example` of each ``(prompt, answer)`` pair."""
    if len(prompts) != len(answers):
        raise ConfigError(f"{len(prompts)} prompts but {len(answers)} answers")
    return [encode_example(tokenizer, p, a, chat) for p, a in zip(prompts, answers, strict=True)]


def encode_conversation(tokenizer: Any, turns: Sequence[tuple[str, str | None]], chat: bool = True) -> EncodedExample:
    r"""A multi-turn conversation about one image, as the prompt of the next answer.

    As MiniGPT-v2's demo: the image is in the first user turn only; every earlier turn is a user message followed by
    the assistant's answer, in the tokenizer's chat template (or the official ``[INST] ... [/INST] answer`` chain
    when it has none), ending with the generation prompt of the last user turn.

    Args:
        tokenizer: The language model's tokenizer.
        turns: ``(user text, assistant answer)`` pairs; the first user text holds ``<ImageHere>`` once (build it
            with :func:`build_prompt`), the others none; the last answer is ``None`` (the one to generate).
        chat: Use the chat template; ``False`` joins the turns with the official ``[INST]`` markers.

    Example:
        >>> from frugalvision.language.llm import tiny_llm
        >>> _, tok = tiny_llm()
        >>> ex = encode_conversation(tok, [(build_prompt("vqa", "defect?"), "yes"), ("[vqa] which?", None)])
        >>> print(tok.decode(ex.after))
        </Img> [vqa] defect?<|im_end|>
        <|im_start|>assistant
        yes<|im_end|>
        <|im_start|>user
        [vqa] which?<|im_end|>
        <|im_start|>assistant
        <BLANKLINE>
    """
    if not turns:
        raise ConfigError("a conversation needs at least one user turn")
    if turns[-1][1] is not None:
        raise ConfigError("the last turn of a conversation to answer must have no answer yet (None)")
    for i, (user, answer) in enumerate(turns):
        want = 1 if i == 0 else 0
        if not isinstance(user, str) or user.count(IMAGE_PLACEHOLDER) != want:
            raise ConfigError(f"turn {i + 1} must hold {IMAGE_PLACEHOLDER} {want} time(s) (the image goes in the "
                              f"first turn only): {user!r}")
        if i < len(turns) - 1 and (not isinstance(answer, str) or not answer.strip()):
            raise ConfigError(f"turn {i + 1} has no answer; only the last turn is left to answer")
    if chat and getattr(tokenizer, "chat_template", None):
        messages: list[dict[str, str]] = []
        for user, answer in turns:
            messages.append({"role": "user", "content": user})
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
        text = str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        bos = False
    else:
        text = " ".join(LLAMA2_TEMPLATE.format(u) + (f" {a}" if a is not None else "") for u, a in turns)
        bos = True
    head, tail = text.split(IMAGE_PLACEHOLDER)
    before = _ids(tokenizer, head)
    if bos and getattr(tokenizer, "bos_token_id", None) is not None:
        before = [tokenizer.bos_token_id, *before]
    return EncodedExample(before, _ids(tokenizer, tail), [])
