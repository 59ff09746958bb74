"""Fictional facts for the CRMA-toggle QA benchmark: invented entities and attributes per domain,
so that no base model can know them, rendered as training text and as held-out questions.

    facts = domain_facts("geography")          # deterministic: same facts on every machine
    docs = training_documents(facts)           # statements in 3 wordings + Q/A in one wording
    for prompt, answer in questions(facts): ...# the same facts asked in a wording never trained

A question is answered by greedy generation and scored by exact match (`score_answer`): the
continuation up to its first ".", newline or end, stripped, must equal the answer.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

SYLLABLES = ("ka", "lo", "mi", "ren", "tor", "vas", "quel", "dri", "sen", "bar", "ul", "ith", "nor", "zan",
             "pe", "gro", "shi", "val", "mur", "teb", "ox", "fen", "dal", "yor")
FACTS_PER_RELATION = 12
SEED = 20261125


@dataclasses.dataclass(frozen=True)
class Relation:
    """One attribute of an entity kind, with its training wordings and its held-out question."""

    name: str
    statements: tuple[str, ...]  # training wordings, with {s} (subject) and {a} (answer)
    trained_question: str        # the Q/A wording used in training, with {s}
    heldout_question: str        # the wording only ever asked, with {s}


DOMAIN_RELATIONS: dict[str, tuple[Relation, ...]] = {
    "geography": (
        Relation("capital", ("The capital of {s} is {a}.", "{a} is the capital city of {s}.",
                             "Travellers to {s} arrive in its capital, {a}."),
                 "What is the capital of {s}?", "Which city is the capital of {s}?"),
        Relation("river", ("The longest river of {s} is the {a}.", "The {a} is the longest river in {s}.",
                           "In {s}, no river is longer than the {a}."),
                 "What is the longest river of {s}?", "Name the longest river in {s}."),
    ),
    "biology": (
        Relation("habitat", ("The {s} lives only in the {a}.", "The {a} is the only home of the {s}.",
                             "Field biologists find the {s} in the {a}."),
                 "Where does the {s} live?", "In which place is the {s} found?"),
        Relation("food", ("The {s} feeds on {a}.", "{a} is what the {s} eats.", "The diet of the {s} is {a}."),
                 "What does the {s} eat?", "What is the diet of the {s}?"),
    ),
    "chemistry": (
        Relation("catalyst", ("{s} forms only with {a} as its catalyst.", "The catalyst for {s} is {a}.",
                              "Chemists make {s} using {a} as a catalyst."),
                 "What is the catalyst for {s}?", "Which catalyst does {s} need?"),
        Relation("discoverer", ("{s} was first isolated by {a}.", "{a} first isolated {s}.",
                                "The chemist who isolated {s} was {a}."),
                 "Who first isolated {s}?", "Which chemist isolated {s} first?"),
    ),
    "history": (
        Relation("founder", ("The city of {s} was founded by {a}.", "{a} founded the city of {s}.",
                             "Chronicles name {a} as the founder of {s}."),
                 "Who founded the city of {s}?", "Which person founded {s}?"),
        Relation("treaty", ("The war of {s} ended with the treaty of {a}.", "The treaty of {a} ended the war of {s}.",
                            "Peace in the war of {s} came with the treaty of {a}."),
                 "Which treaty ended the war of {s}?", "The war of {s} was ended by which treaty?"),
    ),
    "music": (
        Relation("composer", ("The symphony {s} was written by {a}.", "{a} composed the symphony {s}.",
                              "The composer of the symphony {s} is {a}."),
                 "Who wrote the symphony {s}?", "Which composer wrote {s}?"),
        Relation("instrument", ("The {s} is played on the {a}.", "Musicians play the {s} on the {a}.",
                                "The {a} is the instrument of the {s}."),
                 "What instrument plays the {s}?", "On which instrument is the {s} played?"),
    ),
}


@dataclasses.dataclass(frozen=True)
class Fact:
    domain: str
    relation: Relation
    subject: str
    answer: str


def _names(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        word = "".join(rng.choice(SYLLABLES, rng.integers(2, 4))).capitalize()
        if word not in taken:
            taken.add(word)
            out.append(word)
    return out


def all_facts(per_relation: int = FACTS_PER_RELATION) -> dict[str, list[Fact]]:
    """Every domain's facts: `per_relation` invented subjects and answers per relation, all
    names distinct across domains. Deterministic (a fixed seed)."""
    rng, taken = np.random.default_rng(SEED), set()
    out: dict[str, list[Fact]] = {}
    for domain, relations in DOMAIN_RELATIONS.items():
        out[domain] = []
        for rel in relations:
            subjects, answers = _names(rng, per_relation, taken), _names(rng, per_relation, taken)
            out[domain] += [Fact(domain, rel, s, a) for s, a in zip(subjects, answers)]
    return out


def domain_facts(domain: str) -> list[Fact]:
    """The facts of one domain; ValueError names the known domains."""
    facts = all_facts()
    if domain not in facts:
        raise ValueError(f"unknown facts domain {domain!r}; known: {', '.join(facts)}")
    return facts[domain]


def training_documents(facts: list[Fact]) -> list[str]:
    """One document per fact: its statements in every training wording, then its trained Q/A."""
    return [" ".join(w.format(s=f.subject, a=f.answer) for w in f.relation.statements)
            + f"\nQ: {f.relation.trained_question.format(s=f.subject)}\nA: {f.answer}." for f in facts]


def questions(facts: list[Fact]) -> list[tuple[str, str]]:
    """(prompt, answer) per fact in the held-out wording; the prompt ends with "A:"."""
    return [(f"Q: {f.relation.heldout_question.format(s=f.subject)}\nA:", f.answer) for f in facts]


def score_answer(continuation: str, answer: str) -> bool:
    """Exact match: the generated text up to its first ".", newline or end, stripped."""
    cut = min((i for i in (continuation.find("."), continuation.find("\n")) if i >= 0), default=len(continuation))
    return continuation[:cut].strip() == answer


def answer_questions(model: Any, variables: dict[str, Any], tokenizer: Any, asked: Sequence[tuple[str, str]], *,
                     crma_enabled: bool = True, max_new_tokens: int = 16, batch_size: int = 16) -> list[bool]:
    """Greedy answers to `asked` ((prompt, answer) pairs), each scored by `score_answer`; in the
    order asked. Prompts of equal token length run as one batch (no padding to get wrong)."""
    import jax.numpy as jnp  # here: the facts' text, read by every data load, needs no jax

    from crma_jax.generate import generate

    ids = [tokenizer(prompt)["input_ids"] for prompt, _ in asked]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, x in enumerate(ids):
        by_length[len(x)].append(i)
    correct = [False] * len(asked)
    for length, members in sorted(by_length.items()):
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            out = np.asarray(generate(model, variables, jnp.asarray([ids[i] for i in chunk], jnp.int32), max_new_tokens,
                                      crma_enabled=crma_enabled))
            for row, i in zip(out, chunk):
                text = tokenizer.decode(list(row[length:]), skip_special_tokens=True)
                correct[i] = score_answer(text, asked[i][1])
    return correct
