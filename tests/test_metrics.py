import numpy as np
import pytest

from lastmile import metrics


def test_rouge_max_over_references_and_length_adjustment():
    s = metrics.rouge_per_example(["the cat sat on the mat"], [["a dog barked", "the cat sat on the mat"]])
    assert s["rouge1"] == [1.0] and s["rougeL"] == [1.0] and s["la_rougeL"] == [1.0]
    # Twice the reference's length: F drops to 2/3 (P=1/2, R=1), la-ROUGE multiplies by 1/2.
    s = metrics.rouge_per_example(["the cat sat the dog ran"], [["the cat sat"]])
    assert s["rouge1"][0] == pytest.approx(2 / 3)
    assert s["la_rouge1"][0] == pytest.approx(2 / 3 * 0.5)


def test_newline_inside_a_text_is_not_a_sentence_break_for_lsum():
    # Split at the newline, "c d / a b" would match "a b c d" sentence by sentence (union LCS: 4 of
    # 4 words) instead of as one sentence (LCS: 2 of 4).
    ref = "alpha beta gamma delta."
    one_line = metrics.rouge_per_example(["gamma delta alpha beta."], [[ref]])
    broken = metrics.rouge_per_example(["gamma delta\nalpha beta."], [["alpha beta\ngamma delta."]])
    assert broken["rougeLsum"] == one_line["rougeLsum"] == one_line["rougeL"] == [pytest.approx(0.5)]
    assert metrics.split_sentences("gamma delta\nalpha beta. Next one.") == ["gamma delta alpha beta.", "Next one."]


def test_length_ratio():
    assert metrics.length_ratio(10, 20) == 0.5 and metrics.length_ratio(20, 10) == 0.5
    assert metrics.length_ratio(0, 5) == 0.0


def test_paired_bootstrap():
    better = metrics.paired_bootstrap([0.1, 0.2, 0.3, 0.2] * 5, [0.3, 0.4, 0.5, 0.4] * 5, samples=500)
    assert better["mean_diff"] == pytest.approx(0.2) and better["ci_low"] > 0 and better["p_value"] == 0.0
    same = metrics.paired_bootstrap([0.1, 0.5, 0.3] * 5, [0.1, 0.5, 0.3] * 5, samples=200)
    assert same["mean_diff"] == 0 and same["p_value"] == 1.0
    with pytest.raises(ValueError):
        metrics.paired_bootstrap([1.0], [1.0, 2.0])


def test_semantic_similarity_offline():
    scorer = metrics.SemanticScorer("minilm")
    s = scorer.score(["a cat sits on a mat", "", "stock markets fell"],
                     [["the cat sat on the mat"], ["anything"], ["protein folding in cells"]])
    assert s[0] > 0.7 and s[1] == 0.0 and s[2] < 0.3


class FakeEncoder:
    """sentence-transformers' `encode` on letter counts; records every text it encodes."""

    def __init__(self):
        self.encoded: list[str] = []

    def encode(self, texts, *, convert_to_numpy, normalize_embeddings, batch_size):
        self.encoded += texts
        vecs = np.array([[t.lower().count(c) for c in "abcdefghijklmnopqrstuvwxyz"] for t in texts], dtype=float)
        return vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-9)


def test_evaluating_n_systems_embeds_each_reference_once(monkeypatch):
    """Through the evaluate stage's scoring: 3 systems and their post-processed versions, one encoder."""
    from lastmile.config import Config
    from lastmile.data.records import Example
    from lastmile.stages import evaluate

    fake, built, real = FakeEncoder(), [], metrics.SemanticScorer
    monkeypatch.setattr(metrics, "SemanticScorer", lambda name, **kw: built.append(name) or real(name, encoder=fake))
    examples = [Example("a", "doc", "the cat sat", ("the cat sat", "a cat sat down")),
                Example("b", "doc", "markets fell", ("markets fell",))]
    systems = [evaluate.System(n, "x", p) for n, p in (("m", ("a cat", "fell")), ("m+post", ("a cat", "fell")),
                                                        ("b", ("dogs", "stocks")), ("c", ("", "markets fell")))]
    cfg = Config()
    cfg.eval.bootstrap_samples = 10
    results = evaluate.score_systems(systems, examples, cfg, [("m", "b")])
    assert built == ["minilm"]  # one scorer for every system
    # the 3 distinct references once, then each system's 2 predictions
    assert fake.encoded[:3] == ["the cat sat", "a cat sat down", "markets fell"]
    assert len(fake.encoded) == 3 + 2 * len(systems)
    assert results["systems"]["c"]["semantic"] == pytest.approx((0.0 + 1.0) / 2)


def test_semantic_scorer_embeds_each_reference_once_across_systems():
    refs = [["the cat sat", "a cat sat down"], ["stock markets fell"], ["the cat sat"]]
    systems = [["a cat sits", "markets fell", "dogs"], ["", "stocks fell", "the cat sat"], ["x", "y", "z"]]
    fake = FakeEncoder()
    scorer = metrics.SemanticScorer("fake", encoder=fake)
    scores = [scorer.score(preds, refs) for preds in systems]
    distinct_refs = ["the cat sat", "a cat sat down", "stock markets fell"]
    assert fake.encoded == distinct_refs + systems[0] + systems[1] + systems[2]
    # the same numbers as a fresh scorer per system
    assert scores == [metrics.SemanticScorer("fake", encoder=FakeEncoder()).score(p, refs) for p in systems]
    assert scores[1][0] == 0.0 and scores[1][2] == pytest.approx(1.0)


def test_mean_interval_brackets_the_mean_and_shrinks_with_more_examples():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.3, 0.1, 20).tolist(), rng.normal(0.3, 0.1, 2000).tolist()
    lo, hi = metrics.mean_interval(small, samples=500)
    assert lo < np.mean(small) < hi
    lo2, hi2 = metrics.mean_interval(large, samples=500)
    assert lo2 < np.mean(large) < hi2 and (hi2 - lo2) < (hi - lo) / 5
    assert metrics.mean_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)
