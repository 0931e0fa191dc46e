import math
import random
import re

import pytest
import torch

from lastmile.algorithms.losses import auroc, pairwise_loss
from lastmile.config import FAILURE_MODES
from lastmile.data import negatives as neg
from lastmile.data.records import Example

DOC = ("We study graph neural networks for molecule property prediction. Our model, MolGNN, uses 12 message "
       "passing layers. On the QM9 benchmark it reduces error by 15% compared to prior work. We release code.")
EX = Example("a", DOC, "MolGNN uses 12 message passing layers and reduces error on QM9 by 15%. It beats prior work.",
             ("ref",))
OTHERS = [
    EX,
    Example("b", "Transformers for translation.", "A Transformer with 48 layers improves BLEU on WMT14 by 2.1 points.", ("r",)),
    Example("c", "Reinforcement learning for robots.", "PPO policies trained in simulation transfer to Kinova robots.", ("r",)),
]
CTX = neg.NegativeContext(others=OTHERS, vocab=["alpha", " beta", "gam", "ma", " 7"], count_tokens=lambda t: len(t.split()))


def _run(mode, seed=0, ex=EX):
    return neg.MODES[mode](ex, CTX, random.Random(seed))


def test_modes_in_config_match_the_library():
    assert tuple(neg.MODES) == FAILURE_MODES


@pytest.mark.parametrize("mode", FAILURE_MODES)
def test_every_mode_is_deterministic_and_changes_the_text(mode):
    a, b = _run(mode, seed=3), _run(mode, seed=3)
    assert a == b and a is not None and a.strip() != EX.summary


def test_random_tokens_match_reference_length_and_vocab():
    ctx = neg.NegativeContext(others=OTHERS, vocab=["<a>", "<b>", "<c>"], count_tokens=lambda t: len(t.split()))
    out = neg.random_tokens(EX, ctx, random.Random(1))
    pieces = re.findall(r"<[abc]>", out)
    assert "".join(pieces) == out and len(pieces) == len(EX.summary.split())


def test_irrelevant_is_another_documents_summary():
    assert _run("irrelevant") in {o.summary for o in OTHERS[1:]}


def test_shuffles_are_permutations():
    assert sorted(_run("shuffled_words").split()) == sorted(EX.summary.split())
    sents = _run("shuffled_sentences")
    assert sorted(re.split(r"(?<=[.!?])\s+", sents)) == sorted(re.split(r"(?<=[.!?])\s+", EX.summary))
    one = Example("x", DOC, "Only one sentence here.", ("r",))
    assert neg.shuffled_sentences(one, CTX, random.Random(0)) is None


def test_repetition_loops_text():
    for seed in range(6):
        out = neg.repetition(EX, CTX, random.Random(seed))
        words = out.split()
        assert len(words) > len(EX.summary.split())
        looped = any(words[i : i + n] == words[i + n : i + 2 * n] for n in range(2, 7) for i in range(len(words)))
        assert looped or out.count(EX.summary) >= 2


def test_truncated_is_a_strict_prefix():
    for seed in range(6):
        out = neg.truncated(EX, CTX, random.Random(seed))
        assert EX.summary.startswith(out) and len(out) < len(EX.summary) and not out.endswith(".")


def test_source_copy_is_the_documents_opening():
    out = _run("source_copy")
    assert DOC.startswith(out) and len(out.split()) >= len(EX.summary.split())


def test_hallucination_swaps_in_terms_absent_from_the_document():
    out = _run("hallucination")
    added = set(re.findall(r"[\w%.]+", out)) - set(re.findall(r"[\w%.]+", EX.summary))
    assert added and all(a.lower() not in DOC.lower() for a in added)
    assert abs(len(out.split()) - len(EX.summary.split())) <= 2  # same shape, different facts


def test_make_pairs_counts_weights_and_determinism():
    weights = {"shuffled_words": 1.0, "truncated": 1.0, "irrelevant": 0.0}
    pairs = neg.make_pairs(OTHERS, CTX, weights, per_example=3, seed=7)
    assert pairs == neg.make_pairs(OTHERS, CTX, weights, per_example=3, seed=7)
    assert len(pairs) == 9 and {p.mode for p in pairs} <= {"shuffled_words", "truncated"}
    assert all(p.chosen == next(o.summary for o in OTHERS if o.id == p.id) for p in pairs)
    with pytest.raises(KeyError):
        neg.make_pairs(OTHERS, CTX, {"typo_mode": 1.0}, per_example=1, seed=0)


def test_pairs_for_every_mode_skips_inapplicable_modes():
    one = Example("x", DOC, "Only one sentence here about MolGNN.", ("r",))
    pairs = neg.pairs_for_every_mode([one], CTX, FAILURE_MODES, seed=0)
    assert "shuffled_sentences" not in {p.mode for p in pairs} and "irrelevant" in {p.mode for p in pairs}


def test_pairwise_loss_hand_values():
    loss, stats = pairwise_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    expected = (math.log(1 + math.exp(-2.0)) + math.log(2.0)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats == {"accuracy": 0.5, "margin": 1.0}
    loss_m, _ = pairwise_loss(torch.tensor([2.0]), torch.tensor([0.0]), margin=1.0)
    assert loss_m.item() == pytest.approx(math.log(1 + math.exp(-1.0)), rel=1e-6)


def test_auroc_hand_values():
    assert auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auroc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5
    assert auroc(torch.tensor([1.0, 3.0]), torch.tensor([2.0])) == 0.5


def test_packed_reward_scores_equal_padded(tiny_lm, tmp_path):
    """Padding-free packing for the reward model: one score per packed sequence, as padded."""
    from transformers import AutoModelForSequenceClassification

    from lastmile.models import ScalarRewardModel
    from lastmile.stages.reward_model import collate_sequences, pack_sequences

    tiny_lm.save_pretrained(tmp_path / "lm")
    torch.manual_seed(0)
    rm = ScalarRewardModel(AutoModelForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=1)).eval()
    seqs = [tuple(range(5, 25)), tuple(range(7, 12)), tuple(range(100, 103))]
    ids, mask = collate_sequences(seqs, pad_id=2)
    packed_ids, pos = pack_sequences(seqs)
    with torch.no_grad():
        padded = rm(ids, mask)
        packed = rm(packed_ids, torch.ones_like(packed_ids, dtype=torch.bool), pos)
    assert padded.shape == packed.shape == (3,) and torch.allclose(padded, packed, atol=1e-5)
