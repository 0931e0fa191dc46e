import pytest

from trainer import metrics


def test_rouge_max_over_references_and_length_adjustment():
    s = metrics.rouge_per_example(["the cat sat on the mat"], [["a dog barked", "the cat sat on the mat"]])
    assert s["rouge1"] == [1.0] and s["rougeL"] == [1.0] and s["la_rougeL"] == [1.0]
    # Twice the reference's length: F drops to 2/3 (P=1/2, R=1), la-ROUGE multiplies by 1/2.
    s = metrics.rouge_per_example(["the cat sat the dog ran"], [["the cat sat"]])
    assert s["rouge1"][0] == pytest.approx(2 / 3)
    assert s["la_rouge1"][0] == pytest.approx(2 / 3 * 0.5)


def test_length_ratio():
    assert metrics.length_ratio(10, 20) == 0.5 and metrics.length_ratio(20, 10) == 0.5
    assert metrics.length_ratio(0, 5) == 0.0


def test_postprocess_removes_loops_repeats_and_unfinished_tail():
    assert metrics.remove_ngram_loops("we propose a model we propose a model we propose a model for x") == \
        "we propose a model for x"
    assert metrics.remove_ngram_loops("it is very very good") == "it is very very good"
    assert metrics.remove_repeated_sentences("A b. C d. A b. E f.") == "A b. C d. E f."
    # A near-repeat with a new opening (seen in SmolLM2 SFT outputs on ACLSum).
    looped = ("The method aims to extract connotative sentiments from words that are objective on the surface. "
              "They encode linguistic insights into a lexicon. They propose to use insights to extract connotative "
              "sentiments from words that are objective on the surface.")
    assert metrics.remove_repeated_sentences(looped) == (
        "The method aims to extract connotative sentiments from words that are objective on the surface. "
        "They encode linguistic insights into a lexicon.")
    distinct = "We propose a parser for German. It improves accuracy on the TIGER treebank by two points."
    assert metrics.remove_repeated_sentences(distinct) == distinct
    assert metrics.trim_unfinished("We do X. We then do") == "We do X."
    assert metrics.trim_unfinished("We do X and") == "We do X and"  # nothing complete to keep
    assert metrics.postprocess("We win. We win. We win. We also") == "We win."


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
