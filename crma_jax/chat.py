"""Chat conversations through the tokenizer's own chat template, with the loss on assistant turns.

`render_chat` renders a whole conversation with `tokenizer.apply_chat_template` and marks as
targets exactly the tokens of each assistant turn as the template writes it (its content and
end-of-turn marker). The span of turn i is found by rendering the prefix: everything after
`template(messages[:i], add_generation_prompt=True)` and up to `template(messages[:i + 1])`,
which needs no template-specific tags (`{% generation %}`) and so works with any template that
renders a conversation as the concatenation of its turns. A token belongs to a turn when it
starts inside the turn's characters (the fast tokenizer's offsets).
"""

from __future__ import annotations

from typing import Any, Sequence

from crma_jax.records import DataError

Conversation = Sequence[dict[str, str]]


def require_template(tokenizer: Any, source: str) -> None:
    """DataError unless `tokenizer` has a chat template (naming the data that needs one)."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"{source}: chat records need a chat template, and tokenizer {name!r} has none; use an "
                        f"instruct model's tokenizer (--tokenizer) or plain text / Alpaca records")


def _template(tokenizer: Any, messages: Conversation, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer: Any, messages: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """(rendered conversation, [(start, end)] character spans of its assistant turns).

    ValueError if the template does not render the conversation as a concatenation of its
    turns (a prefix renders differently inside the whole), since the spans are then unknown."""
    text = _template(tokenizer, messages)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = _template(tokenizer, messages[:i], generation_prompt=True) if i else ""
        upto = _template(tokenizer, messages[:i + 1])
        if not (text.startswith(upto) and upto.startswith(before)) or len(upto) <= len(before):
            raise ValueError(f"the chat template does not render turn {i + 1} as a continuation of the turns before "
                             f"it, so its tokens cannot be told apart")
        spans.append((len(before), len(upto)))
    return text, spans


def render_chat(tokenizer: Any, messages: Conversation) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of one conversation: the template's tokens, mask 1 on assistant turns."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    mask = [int(any(a <= start < b for a, b in spans)) for start, _ in offsets]
    return ids, mask


def chat_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """The ids of a one-turn user conversation, ready for the assistant's reply (`crma generate --chat`)."""
    require_template(tokenizer, "--chat")
    text = _template(tokenizer, [{"role": "user", "content": prompt}], generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def reply(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """The generated `ids` up to the assistant turn's end: the first special token (EOS, or an
    end-of-turn marker such as `<|im_end|>` or Llama-3's `<|eot_id|>`), not included."""
    special = set(getattr(tokenizer, "all_special_ids", ())) | {getattr(tokenizer, "eos_token_id", None)}
    end = next((i for i, t in enumerate(ids) if t in special), len(ids))
    return list(ids[:end])
