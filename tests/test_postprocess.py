"""Post-processing rules (docs/evaluation.md), one test per rule with its exact output, and a
property test over random texts: it never adds a word, is idempotent, and leaves clean text alone."""

from __future__ import annotations

import random

import pytest

from lastmile.metrics import postprocess, remove_ngram_loops, remove_repeated_sentences, split_sentences, trim_unfinished


def test_loops_repeats_and_unfinished_tail():
    assert remove_ngram_loops("we propose a model we propose a model we propose a model for x") == \
        "we propose a model for x"
    assert remove_ngram_loops("it is very very good") == "it is very very good"
    assert remove_ngram_loops("it is very very very good") == "it is very good"
    assert remove_repeated_sentences("A b. C d. A b. E f.") == "A b. C d. E f."
    assert trim_unfinished("We do X. We then do") == "We do X."
    assert trim_unfinished("We do X and") == "We do X and"  # nothing complete to keep
    assert postprocess("We win. We win. We win. We also") == "We win."


@pytest.mark.parametrize("text", [
    "We propose X. The authors call it “the best.”",
    "We propose X. The authors call it ‘the best.’",
    "We propose X. The authors call it 'the best.'",
    "We propose X. Whether it scales remains open…",
    "We propose X. It wins (see the appendix.)",
    "We propose X. It is «the best.»",
    "We propose X. Does it scale?]",
])
def test_final_sentence_ending_in_closing_quote_bracket_or_ellipsis_is_finished(text):
    assert trim_unfinished(text) == text
    assert postprocess(text) == text


def test_no_sentence_split_after_abbreviations_initials_or_in_decimals():
    assert postprocess("We compare with Smith et al. and outperform them by") == \
        "We compare with Smith et al. and outperform them by"
    text = ("Baselines (e.g. BERT, i.e. the base model, etc.) appear in Fig. 2 and Eq. 3 vs. Dr. J. Smith's cf. "
            "Sec. 4 results, No. 5 of approx. 3.5 points. Mr. and Mrs. Lee agree! Do they? Yes… fully.")
    assert split_sentences(text) == [
        ("Baselines (e.g. BERT, i.e. the base model, etc.) appear in Fig. 2 and Eq. 3 vs. Dr. J. Smith's cf. "
         "Sec. 4 results, No. 5 of approx. 3.5 points."),
        "Mr. and Mrs. Lee agree!", "Do they?", "Yes…", "fully."]
    assert trim_unfinished("Gains reach 3.5 points. They rise to 4.2") == "Gains reach 3.5 points."
    # "et al.", "etc." and initials may also end a sentence: they do when a capitalised opener follows.
    assert split_sentences("As in Smith et al. We show gains on A, B, etc. The code by J. Smith is out. "
                           "See e.g. The Pile. It cites J. A. Smith and the U.S. team.") == [
        "As in Smith et al.", "We show gains on A, B, etc.", "The code by J. Smith is out.", "See e.g. The Pile.",
        "It cites J. A. Smith and the U.S. team."]


def test_loops_of_long_spans_collapse_to_one_copy():
    span = "the proposed model learns a joint representation of the source text and its summary"
    assert len(span.split()) == 14
    assert remove_ngram_loops(" ".join([span] * 3)) == span
    long_span = " ".join(f"w{i}" for i in range(40))
    assert postprocess(f"Intro here. {long_span} {long_span} end.") == f"Intro here. {long_span} end."


def test_sentences_with_a_new_word_a_lost_negation_or_a_new_order_are_kept():
    for text in ["The model is fast. The model is not fast.",
                 "The model is not fast. The model is fast.",
                 "We train for 3 epochs. We train for 5 epochs.",
                 "Accuracy is 80.5 on X. Accuracy is 80 on X.",
                 "A beats B on X. B beats A on X.",
                 "It isn't fast. It is fast.",
                 "X rarely fails. X fails.",  # a lost qualifier changes the claim
                 "Only A beats B on X. A beats B.",
                 "A beats B on few tasks. A beats B.",
                 "The method may improve recall. The method improve recall."]:
        assert remove_repeated_sentences(text) == text
        assert postprocess(text) == text


def test_exact_and_shortened_repeats_are_dropped():
    assert remove_repeated_sentences("The model is fast. the model is fast!") == "The model is fast."
    assert remove_repeated_sentences("The method extracts sentiments from objective words. It is new. "
                                     "The method extracts sentiments.") == \
        "The method extracts sentiments from objective words. It is new."
    # Deleting words that hold no negation: "not fast" survives in the kept sentence.
    assert remove_repeated_sentences("X is not fast on long inputs. X is not fast.") == "X is not fast on long inputs."


def test_rephrased_near_repeat_from_the_smollm2_benchmark_is_kept():
    # The third sentence repeats the first with new words ("propose", "use", "insights"); an earlier
    # 70%-overlap rule dropped it, but a sentence with a word its match lacks is never dropped.
    looped = ("The method aims to extract connotative sentiments from words that are objective on the surface. "
              "They encode linguistic insights into a lexicon. They propose to use insights to extract connotative "
              "sentiments from words that are objective on the surface.")
    assert remove_repeated_sentences(looped) == looped
    distinct = "We propose a parser for German. It improves accuracy on the TIGER treebank by two points."
    assert remove_repeated_sentences(distinct) == distinct


@pytest.mark.parametrize("text", ["...", "🎉", "!!! ???", "?", "—", "🎉 🎉 🎉", "«»"])
def test_punctuation_or_emoji_only_prediction_stays_non_empty(text):
    assert postprocess(text) != ""
    assert postprocess(text) == (text if text != "🎉 🎉 🎉" else "🎉")


def test_whitespace_is_normalised():
    assert postprocess("We propose X.\nIt works\n\non  German.") == "We propose X. It works on German."
    assert split_sentences("It works\non German.\nWe win.") == ["It works on German.", "We win."]


# ----------------------------------------------------------------------------- properties

WORDS = ["we", "the", "model", "is", "not", "fast", "no", "3", "3.5", "It", "a", "b", "c", "x", "y", "z",
         "Smith", "et", "al.", "e.g.", "Fig.", "J.", "isn't", "win", "loses"]
ENDINGS = [".", "!", "?", "…", ".”", ".’", ".'", ".)", "?»", "...", ""]
NOISE = ["...", "🎉", "!!", "—", ",", "(", ")", "“", "?"]
SPACES = [" ", " ", " ", "\n", "  ", "\n\n", "\t"]


def _sentence(rng: random.Random) -> list[str]:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 8))]
    words[-1] += rng.choice(ENDINGS)
    return words


def _messy(rng: random.Random) -> str:
    """Sentences from a small vocabulary, then loops, repeated sentences, noise and a cut."""
    sentences = [_sentence(rng) for _ in range(rng.randint(1, 5))]
    for _ in range(rng.randint(0, 2)):  # repeat a sentence later, exactly or shortened
        s = rng.choice(sentences)
        shortened = [w for w in s if rng.random() < 0.7] or s
        sentences.insert(rng.randint(0, len(sentences)), shortened if rng.random() < 0.5 else list(s))
    words = [w for s in sentences for w in s]
    for _ in range(rng.randint(0, 3)):  # loop a span 1-3 extra times
        i, n = rng.randrange(len(words)), rng.randint(1, 16)
        words[i + n : i + n] = words[i : i + n] * rng.randint(1, 3)
    for _ in range(rng.randint(0, 2)):
        words.insert(rng.randint(0, len(words)), rng.choice(NOISE))
    words = words[: rng.randint(1, len(words))]
    return rng.choice(["", " ", "\n"]) + "".join(w + rng.choice(SPACES) for w in words)


def _is_subsequence(short: list[str], long: list[str]) -> bool:
    it = iter(long)
    return all(w in it for w in short)


def test_postprocess_never_adds_words_never_empties_and_is_idempotent():
    rng = random.Random(0)
    for _ in range(400):
        text = _messy(rng)
        out = postprocess(text)
        assert _is_subsequence(out.split(), text.split()), (text, out)  # so every word is an input word
        assert len(out.split()) <= len(text.split())
        assert out.strip() or not text.strip(), text
        assert postprocess(out) == out, (text, out)


def test_postprocess_leaves_clean_text_unchanged():
    """Distinct finished sentences: each has a word no other sentence has, shared words are never
    adjacent (so no span can loop), and every sentence ends in terminal punctuation."""
    rng = random.Random(1)
    shared = ["the", "is", "not", "3.5", "et al.", "e.g.", "Fig.", "J.", "isn't", "(see", "3)"]
    for case in range(300):
        sentences = []
        for k in range(rng.randint(1, 5)):
            words = [f"w{case}x{k}x{j}" if j % 2 == 0 else rng.choice(shared) for j in range(rng.randint(0, 4) * 2 + 1)]
            sentences.append(" ".join(words) + rng.choice(ENDINGS[:-1]))
        text = " ".join(sentences)
        assert postprocess(text) == text, text
