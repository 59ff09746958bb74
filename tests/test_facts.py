"""`crma_jax.facts`: the fictional facts, their held-out questions and the exact-match scorer."""

from __future__ import annotations

import jax.numpy as jnp

import crma_jax
from crma_jax.facts import (DOMAIN_RELATIONS, FACTS_PER_RELATION, all_facts, answer_questions, domain_facts, questions,
                            score_answer, training_documents)
from crma_jax.generate import generate
from crma_jax.pretrained import load_tokenizer


def test_facts_are_deterministic_distinct_and_enough_for_100_questions():
    facts = all_facts()
    assert facts == all_facts()
    names = [x for fs in facts.values() for f in fs for x in (f.subject, f.answer)]
    assert len(names) == len(set(names))  # no entity or answer shared between facts
    assert sum(len(fs) for fs in facts.values()) == len(DOMAIN_RELATIONS) * 2 * FACTS_PER_RELATION >= 100


def test_questions_use_a_wording_never_trained_and_docs_state_every_answer():
    facts = domain_facts("history")
    docs = training_documents(facts)
    for fact, doc, (prompt, answer) in zip(facts, docs, questions(facts)):
        assert answer == fact.answer and doc.count(answer) == len(fact.relation.statements) + 1
        asked = prompt.removeprefix("Q: ").removesuffix("\nA:")
        assert asked not in "".join(docs) and fact.subject in asked


def test_score_answer_is_exact_up_to_the_first_stop():
    assert score_answer(" Kalo. More text", "Kalo")
    assert score_answer(" Kalo\nQ: next", "Kalo") and score_answer(" Kalo ", "Kalo")
    assert not score_answer(" Kalo is a city.", "Kalo") and not score_answer(" kalo.", "Kalo")
    assert not score_answer("", "Kalo")


def test_batched_answers_equal_one_by_one_generation(tiny_lm):
    model, params = crma_jax.load_pretrained(tiny_lm)
    variables = {"params": params}
    tokenizer = load_tokenizer(tiny_lm)
    asked = questions(domain_facts("music"))[:6]
    # Make one answer exactly what the model generates, so both outcomes are exercised.
    prompt = asked[0][0]
    ids = tokenizer(prompt)["input_ids"]
    greedy = tokenizer.decode(list(generate(model, variables, jnp.asarray([ids]), 16)[0, len(ids):]),
                              skip_special_tokens=True)
    asked[0] = (prompt, greedy.split(".")[0].split("\n")[0].strip())
    batched = answer_questions(model, variables, tokenizer, asked, batch_size=4)
    one_by_one = []
    for p, a in asked:
        x = tokenizer(p)["input_ids"]
        text = tokenizer.decode(list(generate(model, variables, jnp.asarray([x]), 16)[0, len(x):]),
                                skip_special_tokens=True)
        one_by_one.append(score_answer(text, a))
    assert batched == one_by_one and batched[0]
