"""The pretraining corpus: plain text that teaches the world's language and facts, but not chat behaviour.

Documents are encyclopedia snippets (countries, animals, colours, opposites), arithmetic worksheets, word games
(reversals, letter counts, sorting), pattern lists (the raw material of in-context learning), short stories and
Q/A quizzes. There are no chat turns, refusals or "I don't know"s: those come from the demonstrations. The unknowable
family's invented names never appear, and no arithmetic or string problem that any seed's eval split may ask
(`tasks.eval_only`, and the `held_out` keys) is in it, so eval measures generalisation rather than recall of a worked
example, for a base model pretrained on any seed's corpus.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from flywheel.world.tasks import eval_only, random_rule, relations, state_fact, world_data
from flywheel.world.text import article, capitalize


def _fact_sentence(rng: random.Random, rel_name: str, subject: str, value: str) -> str:
    alt = {
        "capital": [
            "{v} is the capital of {s}.",
            "{v} is the capital city of {s}.",
            "The capital city of {s} is {v}.",
        ],
        "continent": ["{s} is a country in {v}.", "{s} lies in {v}.", "{s} is on the continent of {v}."],
        "sound": ["{A} makes the sound {v}.", "The sound {a} makes is {v}.", "When {a} speaks, it says {v}."],
        "legs": ["{A} walks on {v} legs.", "{A} has exactly {v} legs."],
        "young": ["A young {s} is called {av}.", "The baby of {a} is {av}."],
        "colour": ["The colour of {s} is {v}.", "{S} is usually {v}."],
        "opposite": ["{s} and {v} are opposites.", "The word {v} means the opposite of {s}."],
    }[rel_name]
    if rng.random() < 0.5:
        return capitalize(state_fact(relations()[rel_name], subject, value))
    return capitalize(
        rng.choice(alt).format(
            s=subject,
            S=capitalize(subject),
            a=article(subject),
            A=capitalize(article(subject)),
            v=value,
            av=article(value),
        )
    )


def _facts_doc(rng: random.Random, rel_names: list[str]) -> str:
    lines = []
    for _ in range(rng.randint(3, 8)):
        rel = relations()[rng.choice(rel_names)]
        subject, value = rng.choice(rel.pairs)
        lines.append(_fact_sentence(rng, rel.name, subject, value))
    return " ".join(lines)


def _country_doc(rng: random.Random, held_out: set[str]) -> str:
    country, capital, continent = rng.choice(world_data()["countries"])
    lines = [f"{country} is a country in {continent}.", f"The capital of {country} is {capital}."]
    lines += [_fact_sentence(rng, "capital", c, cap) for c, cap in rng.sample(relations()["capital"].pairs, 2)]
    lines.append(_facts_doc(rng, ["capital", "continent"]))
    rng.shuffle(lines)
    return " ".join(lines)


def _arith_line(rng: random.Random, held_out: set[str]) -> str | None:
    op = rng.choices(["+", "-", "*"], weights=[0.4, 0.35, 0.25])[0]
    if op == "*":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        r = a * b
    elif op == "+":
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        r = a + b
    else:
        a = rng.randint(0, 60)
        b = rng.randint(0, a)
        r = a - b
    if f"arith:{op}:{a}:{b}" in held_out:
        return None
    word = {"+": "plus", "-": "minus", "*": "times"}[op]
    forms = [f"{a} {op} {b} = {r}", f"{a} {op} {b} = {r}.", f"{a} {word} {b} is {r}.", f"{a} {word} {b} equals {r}."]
    if op == "+":
        forms.append(f"If you have {a} apples and get {b} more, you have {r} apples.")
    elif op == "-":
        forms.append(f"If you have {a} coins and spend {b}, you have {r} coins left.")
    else:
        forms.append(f"{a} boxes with {b} eggs each hold {r} eggs.")
    if rng.random() < 0.15 and f"arith:*:{r}:2" not in held_out:  # a doubling works r * 2: not if held out
        forms = [f"Double {r} is {2 * r}.", f"{r} * 2 = {2 * r}."]
        forms += [f"Half of {r} is {r // 2}.", f"{r} / 2 = {r // 2}."] if r % 2 == 0 else []
    return rng.choice(forms)


def _arithmetic_doc(rng: random.Random, held_out: set[str]) -> str:
    lines = [line for _ in range(rng.randint(4, 12)) if (line := _arith_line(rng, held_out))]
    header = rng.choice(["Arithmetic practice:", "Math worksheet.", "Some sums:", ""])
    return "\n".join([header, *lines] if header else lines)


def _string_doc(rng: random.Random, held_out: set[str]) -> str:
    words = world_data()["words"]
    lines = []
    for _ in range(rng.randint(3, 8)):
        w = rng.choice(words)
        kind = rng.choice(["reverse", "sort_letters", "count", "sort_words", "spell"])
        if kind == "reverse" and f"reverse:{w}" not in held_out and w != w[::-1]:
            lines.append(
                rng.choice(['The word "{w}" spelled backwards is "{r}".', '"{w}" backwards is "{r}".']).format(
                    w=w, r=w[::-1]
                )
            )
        elif kind == "sort_letters" and f"sort_letters:{w}" not in held_out:
            lines.append(f'The letters of "{w}" in alphabetical order are "{"".join(sorted(w))}".')
        elif kind == "count":
            c = rng.choice(w)
            if f"count:{w}:{c}" not in held_out:
                n = w.count(c)
                lines.append(f'The letter "{c}" appears {n} time{"s" if n != 1 else ""} in "{w}".')
        elif kind == "sort_words":
            ws = rng.sample(words, 3)
            if "sort_words:" + ",".join(sorted(ws)) not in held_out:
                lines.append(f"In alphabetical order, {', '.join(ws)} becomes {', '.join(sorted(ws))}.")
        elif kind == "spell":
            lines.append(f'"{w}" is spelled {"-".join(w)} and has {len(w)} letters.')
    return " ".join(lines)


def _answers_held_out(word: str, changed: str, held_out: set[str]) -> bool:
    """Whether a puzzle line "word -> changed" works a held-out string problem (a reversal, or the letters sorted:
    "table -> elbat", also by a rule that only agrees on this word, as swapping the ends of a 3-letter word)."""
    return (changed == word[::-1] and f"reverse:{word}" in held_out) or (
        changed == "".join(sorted(word)) and f"sort_letters:{word}" in held_out
    )


def _pattern_doc(rng: random.Random, held_out: set[str]) -> str:
    """A list of "x -> y" lines that share one rule: mostly one of the world's relations ("France -> Paris"),
    sometimes an invented spelling rule ("cat -> catzo"). Such lists are where a base model learns to tell from the
    examples which rule a list follows (the few-shot family asks it of a new subject)."""
    if rng.random() < 0.25:
        _, rule = random_rule(rng)
        pool = [w for w in world_data()["words"] if 3 <= len(w) <= 6 and not _answers_held_out(w, rule(w), held_out)]
        lines = [f"{w} -> {rule(w)}" for w in rng.sample(pool, rng.randint(3, 9)) if rule(w) != w]
        return "\n".join([rng.choice(["Word puzzle.", "Each word is changed by the same rule."]), *lines])
    rel = relations()[rng.choice(sorted(relations()))]
    pairs = rng.sample(rel.pairs, min(len(rel.pairs), rng.randint(3, 9)))
    header = rng.choice(["Pattern:", "Follow the pattern.", "Continue the pattern.", "Pairs:", "Apply the same rule."])
    return "\n".join([header, *(f"{s} -> {v}" for s, v in pairs)])


_STORY = [
    "{name} lived in {capital}, the capital of {country}.",
    "One morning {name} saw {animal_a} in the garden. The {animal} said {sound}!",
    "{name} had {a} apples and found {b} more, so now {name} had {s} apples.",
    "On the way home {name} looked up: the sky was blue and {thing} was {colour}.",
    "{name} packed a bag and took a train to {capital2} in {country2}.",
    'At school, {name} wrote the word "{word}" backwards: "{drow}".',
    "{name} counted the legs of {legs_animal}: it has {legs} legs.",
    '"Is it {o1} or {o2}?" asked {name}. They are opposites.',
    "In the evening {name} told {friend} about the trip.",
]


def _story_doc(rng: random.Random, held_out: set[str]) -> str:
    d = world_data()
    country, capital, _ = rng.choice(d["countries"])
    country2, capital2, _ = rng.choice(d["countries"])
    animal, sound = rng.choice(relations()["sound"].pairs)
    animal_legs, legs = rng.choice(relations()["legs"].pairs)
    thing, colour = rng.choice(d["colours"])
    o1, o2 = rng.choice(d["opposites"])
    name, friend = rng.sample(d["people"], 2)
    word = rng.choice([w for w in d["words"] if f"reverse:{w}" not in held_out])
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    sentences = [_STORY[0]] + rng.sample(_STORY[1:], rng.randint(3, 6))
    return " ".join(sentences).format(
        name=name,
        friend=friend,
        capital=capital,
        country=country,
        capital2=capital2,
        country2=country2,
        animal=animal,
        animal_a=article(animal),
        sound=sound,
        a=a,
        b=b,
        s=a + b,
        thing=thing,
        colour=colour,
        word=word,
        drow=word[::-1],
        o1=o1,
        o2=o2,
        legs=legs,
        legs_animal=article(animal_legs),
    )


def _qa_doc(rng: random.Random, held_out: set[str]) -> str:
    lines = [rng.choice(["Quiz.", "Questions and answers.", "Test yourself."])]
    for _ in range(rng.randint(3, 6)):
        if rng.random() < 0.3:
            line = _arith_line(rng, held_out)
            if line and "=" in line and not line.endswith("."):
                q, r = line.split(" = ")
                lines += [f"Q: What is {q}?", f"A: {r}."]
            continue
        rel = relations()[rng.choice(list(relations()))]
        subject, value = rng.choice(rel.pairs)
        q = rng.choice(rel.questions).format(s=subject, a=article(subject), S=capitalize(subject))
        # Half the answers restate the question, as the demonstrators do ("The capital of Kenya is Nairobi."):
        # without them a small model learns facts but not to carry a question's subject into its answer.
        answer = capitalize(state_fact(rel, subject, value)) if rng.random() < 0.5 else f"{capitalize(value)}."
        lines += [f"Q: {q}", f"A: {answer}"]
    return "\n".join(lines)


_DOCS: list[tuple[Callable[[random.Random, set[str]], str], float]] = [
    (_country_doc, 0.15),
    (lambda r, h: _facts_doc(r, ["sound", "legs", "young"]), 0.10),
    (lambda r, h: _facts_doc(r, ["colour", "opposite"]), 0.10),
    (lambda r, h: _facts_doc(r, list(relations())), 0.05),
    (_arithmetic_doc, 0.17),
    (_string_doc, 0.10),
    (_pattern_doc, 0.12),
    (_story_doc, 0.08),
    (_qa_doc, 0.13),
]


class _Excluded(set[str]):
    """The problem keys the corpus leaves out: the given ones and every eval-only one."""

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and (super().__contains__(key) or eval_only(key))


def make_corpus(rng: random.Random, n_chars: int, held_out: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Documents (no blank lines inside) totalling at least `n_chars` characters."""
    makers, weights = zip(*_DOCS, strict=True)
    docs: list[str] = []
    size = 0
    held = _Excluded(held_out)
    while size < n_chars:
        doc = rng.choices(makers, weights=weights)[0](rng, held).strip()
        if doc:
            docs.append(doc)
            size += len(doc)
    return docs
