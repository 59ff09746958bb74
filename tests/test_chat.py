"""Chat records on the real SmolLM2 chat template: the loss mask covers exactly the assistant turns."""

from __future__ import annotations

import json

import numpy as np
import pytest

from crma_jax.chat import assistant_spans, chat_prompt, render_chat, reply, require_template
from crma_jax.data import DataSpec, tokenize_records
from crma_jax.records import DataError, Fields, check_rows

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of Norway?"},
     {"role": "assistant", "content": "Oslo."}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Colour of the sky?"},
     {"role": "assistant", "content": "Blue"},
     {"role": "user", "content": "And at night, roughly?"},
     {"role": "assistant", "content": "Black, with stars: 42 of them,\nmore or less."}],
]


@pytest.fixture(scope="module")
def smol_tok(smollm2_gguf_path):
    from crma_jax.pretrained import load_tokenizer

    return load_tokenizer(smollm2_gguf_path)


@pytest.mark.slow
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_masked_tokens_are_exactly_the_assistant_turns(smol_tok, messages):
    ids, mask = render_chat(smol_tok, messages)
    assert len(ids) == len(mask)
    assert smol_tok.decode(ids) == smol_tok.apply_chat_template(messages, tokenize=False)
    # Each run of masked tokens decodes to one assistant turn as the template writes it: its
    # content and the end-of-turn marker; nothing of the system or user turns is a target.
    runs, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    turns = [t["content"] for t in messages if t["role"] == "assistant"]
    assert [smol_tok.decode(r) for r in runs] == [f"{c}<|im_end|>\n" for c in turns]
    unmasked = smol_tok.decode([t for t, m in zip(ids, mask) if not m])
    assert all(t["content"] in unmasked for t in messages if t["role"] != "assistant")
    assert "<|im_start|>assistant\n" in unmasked  # the generation prompt is not learnt


@pytest.mark.slow
def test_chat_jsonl_packs_with_assistant_targets_and_no_extra_eos_target(smol_tok, tmp_path):
    path = tmp_path / "chat.jsonl"
    # Ten distinct conversations: the data path drops exact duplicates before packing.
    convs = [[dict(t, content=f"{t['content']} ({i})") if t["role"] == "user" else t for t in m]
             for i in range(5) for m in CONVERSATIONS]
    path.write_text("".join(json.dumps({"conv": m}) + "\n" for m in convs))
    spec = DataSpec(str(path), seq_len=64, messages_field="conv", holdout_fraction=0.2)
    train, holdout = spec.build(smol_tok, vocab_size=49152)
    docs = tokenize_records(spec.records(), smol_tok)
    targets = sum(sum(m) for _, m in docs)
    # Every assistant token is a target once, less at most one per row (a continued chunk's first
    # token has no predecessor in its row); the separator EOS after each conversation is not.
    got = int(train.loss_mask.sum() + holdout.loss_mask.sum())
    assert targets - train.num_rows - holdout.num_rows <= got <= targets
    eos = smol_tok.eos_token_id
    ids = np.concatenate([train.input_ids, holdout.input_ids])
    mask = np.concatenate([train.loss_mask, holdout.loss_mask])
    newline = smol_tok("\n", add_special_tokens=False)["input_ids"][0]
    newline_then_eos = (ids[:, 1:] == eos) & (ids[:, :-1] == newline)
    assert newline_then_eos.any() and not (mask[:, 1:][newline_then_eos]).any()
    # Chat training data with a plain-text eval set: each side keeps its own EOS rule.
    text = tmp_path / "eval.jsonl"
    text.write_text("".join(json.dumps({"text": f"plain text number {i}."}) + "\n" for i in range(4)))
    train, holdout = DataSpec(str(path), seq_len=64, messages_field="conv", eval_source=str(text)).build(smol_tok)
    train_eos = (train.input_ids[:, 1:] == eos) & (train.input_ids[:, :-1] == newline)
    assert train_eos.any() and not train.loss_mask[:, 1:][train_eos].any()
    assert holdout.loss_mask[holdout.input_ids == eos].any()  # a text document's EOS is a target


@pytest.mark.slow
def test_generation_prompt_is_the_template_with_an_open_assistant_turn(smol_tok):
    ids = chat_prompt(smol_tok, "Hello?")
    assert smol_tok.decode(ids).endswith("<|im_start|>user\nHello?<|im_end|>\n<|im_start|>assistant\n")
    turn = smol_tok("Oslo.<|im_end|>\n<|im_start|>user\nAnd", add_special_tokens=False)["input_ids"]
    assert smol_tok.decode(reply(smol_tok, turn)) == "Oslo."  # the turn ends at its end-of-turn token
    assert reply(smol_tok, turn[:2]) == turn[:2]  # no end yet: all of it


def test_a_tokenizer_without_a_template_is_named(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "</s>": 1}, unk_token="a")),
                                  eos_token="</s>")
    with pytest.raises(DataError, match="chat.jsonl: chat records need a chat template"):
        require_template(tok, "chat.jsonl")
    records = check_rows([{"messages": CONVERSATIONS[0]}], Fields(), "chat.jsonl")
    with pytest.raises(DataError, match="chat records need a chat template"):
        tokenize_records(records, tok)


def test_a_template_that_rewrites_earlier_turns_is_refused():
    class Tok:
        """A template that numbers turns from the end: a prefix renders differently inside the whole."""

        def apply_chat_template(self, messages, tokenize, add_generation_prompt=False):
            n = len(messages)
            return "".join(f"[{n - i}]{m['content']}" for i, m in enumerate(messages)) + ("[A]" if add_generation_prompt else "")

    with pytest.raises(ValueError, match="does not render turn 2 as a continuation"):
        assistant_spans(Tok(), CONVERSATIONS[0])


def test_a_conversation_the_template_rejects_is_named_by_its_line_after_skipped_rows(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    from crma_jax.records import load_records

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "</s>": 1}, unk_token="a")),
                                  eos_token="</s>")
    tok.chat_template = ("{% for m in messages %}{% if m['content'] == 'no' %}{{ raise_exception('refused') }}"
                         "{% endif %}{{ m['content'] }}{% endfor %}")
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": []}, {"messages": CONVERSATIONS[0]},
            {"messages": [{"role": "user", "content": "no"}, {"role": "assistant", "content": "a"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_records(path, cache_dir=str(tmp_path / "cache"), skip_bad=True)
    assert "line 1: field 'messages': an empty conversation" in records.skipped
    with pytest.raises(DataError, match=r"chat.jsonl: line 3: the chat template rejects this conversation .*refused"):
        tokenize_records(records, tok)
