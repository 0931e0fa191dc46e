"""Synthetic failure modes: negatives made from the data itself, for a reward model without labels.

Each mode is a pure function `(example, context, rng) -> str | None`: a bad summary of
`example.document` made from its reference (None when the mode does not apply, e.g. a sentence
shuffle of a one-sentence summary). Same seed, same output. A new mode is one function plus one
entry in MODES (and a weight in the config's `rm.mode_weights`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from lastmile.data.records import Example

_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*%?")
_WORD = re.compile(r"[A-Za-z][A-Za-z\-]+")


@dataclass(frozen=True)
class NegativeContext:
    others: Sequence[Example]  # other records: irrelevant summaries and foreign terms come from here
    vocab: Sequence[str]  # decoded tokenizer pieces, for random-token negatives
    count_tokens: Callable[[str], int]  # tokens in a text, for length-matched random tokens


def random_tokens(ex: Example, ctx: NegativeContext, rng: random.Random) -> str | None:
    """Tokens sampled uniformly from the vocabulary, as many as the reference has."""
    n = max(1, ctx.count_tokens(ex.summary))
    return "".join(rng.choice(ctx.vocab) for _ in range(n)).strip() or None


def irrelevant(ex: Example, ctx: NegativeContext, rng: random.Random) -> str | None:
    """Coherent but about something else: another document's reference summary."""
    pool = [o for o in ctx.others if o.id != ex.id and o.summary != ex.summary]
    return rng.choice(pool).summary if pool else None


def shuffled_words(ex: Example, ctx: NegativeContext, rng: random.Random) -> str | None:
    """The reference's words in random order (a permutation that differs from the original)."""
    perm = _permuted(ex.summary.split(), rng)
    return " ".join(perm) if perm else None


def shuffled_sentences(ex: Example, ctx: NegativeContext, rng: random.Random) -> str | None:
    """The reference's sentences in another order (needs two or more distinct sentences)."""
    perm = _permuted(_SENT_SPLIT.split(ex.summary.strip()), rng)
    return " ".join(perm) if perm else None


def _permuted(items: list[str], rng: random.Random) -> list[str] | None:
    if len(set(items)) < 2:
        return None
    for _ in range(10):
        perm = items[:]
        rng.shuffle(perm)
        if perm != items:
            return perm
    return None


def repetition(ex: Example, ctx: NegativeContext, rng: random.Random) -> str | None:
    """A phrase of the reference looped 3-5 times in place, or the whole reference repeated."""
    words = ex.summary.split()
    if len(words) < 4 or rng.random() < 0.3:
        return " ".join([ex.summary] * rng.randint(2, 3))
    span = rng.randint(2, min(6, len(words) // 2))
    start = rng.randint(0, len(words) - span)
    phrase = words[start : start + span]
    return " ".join(words[: start + span] + phrase * rng.randint(2, 4) + words[start + span :])


def truncated(ex: Example, ctx: NegativeContext, rng: random.Random) -> str | None:
    """A strict prefix of the reference, cut mid-sentence between 30% and 70% of its words."""
    words = ex.summary.split()
    if len(words) < 4:
        return None
    cut = rng.randint(max(1, int(len(words) * 0.3)), max(1, int(len(words) * 0.7)))
    prefix = " ".join(words[:cut]).rstrip(".,;:!?")
    return prefix if prefix and prefix != ex.summary else None


def source_copy(ex: Example, ctx: NegativeContext, rng: random.Random) -> str | None:
    """The document's leading sentences instead of a summary, at least as long as the reference."""
    sents = _SENT_SPLIT.split(ex.document.strip())
    target = len(ex.summary.split())
    out: list[str] = []
    for s in sents:
        out.append(s)
        if len(" ".join(out).split()) >= max(target, 1) and len(out) >= 2:
            break
    text = " ".join(out)
    return text if text and text != ex.summary else None


def hallucination(ex: Example, ctx: NegativeContext, rng: random.Random) -> str | None:
    """Numbers, names and key terms of the reference swapped for ones that never occur in the
    document (taken from other documents): fluent, on-format, and unfaithful."""
    doc_lower = ex.document.lower()
    foreign_numbers, foreign_terms = _foreign_vocabulary(ex, ctx.others, doc_lower)
    text, swaps = ex.summary, 0
    numbers = list(dict.fromkeys(_NUMBER.findall(text)))
    for num in numbers:
        if foreign_numbers:
            text = re.sub(rf"(?<![\d.]){re.escape(num)}(?![\d])", rng.choice(foreign_numbers), text, count=1)
            swaps += 1
    # Names and key terms: acronyms, capitalized words past the first, hyphenated and long words,
    # preferring those the reference shares with the document (the facts a summary must keep).
    words = list(dict.fromkeys(_WORD.findall(text)))
    candidates = [w for i, w in enumerate(words) if _is_term(w, first=i == 0)]
    candidates.sort(key=lambda w: (w.lower() not in doc_lower, rng.random()))
    n_terms = max(1, min(3, len(candidates) // 2)) if candidates else 0
    for w in candidates[:n_terms]:
        pool = [t for t in foreign_terms if _shape(t) == _shape(w)] or \
               [t for t in foreign_terms if _shape(t)[0] == _shape(w)[0]]
        if pool:
            text = re.sub(rf"\b{re.escape(w)}\b", rng.choice(pool), text, count=1)
            swaps += 1
    return text if swaps and text != ex.summary else None


def _is_term(w: str, *, first: bool) -> bool:
    return (w.isupper() and len(w) > 1) or (w[0].isupper() and not first) or "-" in w or len(w) >= 7


def _shape(w: str) -> tuple[str, str]:
    """(class, suffix): swaps keep the class (acronym, name, hyphenated, word) and, for plain
    words, the last three letters (-ing for -ing, -ion for -ion), so the sentence stays fluent."""
    if w.isupper() and len(w) > 1:
        return ("acronym", "")
    if w[0].isupper():
        return ("name", "")
    if "-" in w:
        return ("hyphenated", "")
    return ("word", w[-3:].lower())


def _foreign_vocabulary(ex: Example, others: Sequence[Example], doc_lower: str) -> tuple[list[str], list[str]]:
    numbers, terms = set(), set()
    for o in others[:200]:
        if o.id == ex.id:
            continue
        numbers.update(n for n in _NUMBER.findall(o.summary) if n.lower() not in doc_lower)
        terms.update(w for w in _WORD.findall(o.summary) if _is_term(w, first=False) and w.lower() not in doc_lower)
    return sorted(numbers), sorted(terms)


MODES: dict[str, Callable[[Example, NegativeContext, random.Random], str | None]] = {
    "random_tokens": random_tokens,
    "irrelevant": irrelevant,
    "shuffled_words": shuffled_words,
    "shuffled_sentences": shuffled_sentences,
    "repetition": repetition,
    "truncated": truncated,
    "source_copy": source_copy,
    "hallucination": hallucination,
}


@dataclass(frozen=True)
class Pair:
    id: str  # example id
    mode: str
    chosen: str  # the reference summary
    rejected: str  # the negative


def make_pairs(examples: Sequence[Example], ctx: NegativeContext, weights: dict[str, float], *, per_example: int,
               seed: int) -> list[Pair]:
    """`per_example` negatives per example, modes drawn by `weights` (modes that do not apply to
    an example are redrawn among the others). Deterministic in `seed`."""
    unknown = sorted(set(weights) - set(MODES))
    if unknown:
        raise KeyError(f"unknown failure modes {unknown}; known: {sorted(MODES)}")
    pairs = []
    for ex in examples:
        rng = random.Random(f"{seed}:{ex.id}")
        active = {m: w for m, w in weights.items() if w > 0}
        made = 0
        while made < per_example and active:
            mode = rng.choices(list(active), weights=list(active.values()))[0]
            neg = MODES[mode](ex, ctx, rng)
            if neg is None or neg.strip() == ex.summary.strip():
                active.pop(mode)
                continue
            pairs.append(Pair(ex.id, mode, ex.summary, neg))
            made += 1
    return pairs


def pairs_for_every_mode(examples: Sequence[Example], ctx: NegativeContext, modes: Sequence[str], *,
                         seed: int) -> list[Pair]:
    """One negative per (example, mode) where the mode applies: the per-mode evaluation set."""
    pairs = []
    for ex in examples:
        for mode in modes:
            neg = MODES[mode](ex, ctx, random.Random(f"{seed}:{ex.id}:{mode}"))
            if neg is not None and neg.strip() != ex.summary.strip():
                pairs.append(Pair(ex.id, mode, ex.summary, neg))
    return pairs
