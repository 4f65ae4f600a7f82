"""ROUGE-L F1 and exact match against hand-computed and published values."""

import pytest

from fstqcodec.sim.rouge import exact_match, lcs_length, mean_scores, rouge_l, tokens


def test_rouge_score_readme_example():
    # rouge-score's README: target "The quick brown fox jumps over the lazy dog", prediction
    # "The quick brown dog jumps on the log." gives rougeL P=0.625, R=0.5556, F=0.5882.
    f1 = rouge_l("The quick brown dog jumps on the log.", "The quick brown fox jumps over the lazy dog")
    assert f1 == pytest.approx(2 * 0.625 * (5 / 9) / (0.625 + 5 / 9))
    assert f1 == pytest.approx(0.5882, abs=1e-4)


def test_lcs_is_a_subsequence_not_a_substring():
    assert lcs_length("a b c d e".split(), "a x c y e".split()) == 3  # a, c, e: not contiguous
    assert lcs_length("a b c".split(), "c b a".split()) == 1
    assert lcs_length([], "a".split()) == 0
    # the cat (sat|is) on the mat: LCS 5 of 6 and 6 -> F1 = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)


def test_case_punctuation_and_scripts():
    assert tokens("Birth Control!") == ["birth", "control"]
    assert rouge_l("birth control", "Birth Control") == 1.0
    assert rouge_l("Estoy bien, ¿y tú?", "estoy bien y tú") == 1.0
    assert rouge_l("", "") == 1.0 and rouge_l("", "pain") == 0.0 and rouge_l("pain", "") == 0.0
    assert rouge_l("depression", "anxiety") == 0.0


def test_exact_match_and_means():
    assert exact_match("Pain.", "pain") and not exact_match("chronic pain", "pain")
    scores = mean_scores(["pain", "acne vulgaris", "x"], ["Pain", "Acne", "obesity"])
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["rouge_l"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)  # acne: P=1/2, R=1 -> 2/3
    with pytest.raises(ValueError, match="as many candidates"):
        mean_scores(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        mean_scores([], [])
