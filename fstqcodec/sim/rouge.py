"""ROUGE-L F1 and exact match for generated answers (pure Python, no dependencies).

ROUGE-L (Lin, 2004) scores a candidate against a reference by their longest common subsequence of
tokens: precision ``LCS / len(candidate)``, recall ``LCS / len(reference)``, F1 their harmonic mean
(the ``rouge-score`` package's ``rougeL`` F-measure with beta = 1). Tokens are lower-cased runs of
word characters, so the score works for any script that ``\\w`` matches (Latin, Cyrillic, CJK runs).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["tokens", "lcs_length", "rouge_l", "exact_match", "mean_scores"]

_WORD = re.compile(r"\w+", re.UNICODE)


def tokens(text: str) -> list[str]:
    """Lower-cased word tokens of ``text`` (punctuation and whitespace dropped)."""
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for item in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if item == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of ``candidate`` against ``reference``, in [0, 1].

    Two empty texts score 1 (they agree); one empty text scores 0.
    """
    cand, ref = tokens(candidate), tokens(reference)
    if not cand or not ref:
        return float(not cand and not ref)
    common = lcs_length(cand, ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(cand), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(candidate: str, reference: str) -> bool:
    """Whether the two texts have the same word tokens (case and punctuation ignored)."""
    return tokens(candidate) == tokens(reference)


def mean_scores(candidates: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-L F1 and exact-match rate over pairs.

    Raises
    ------
    ValueError
        If the sequences differ in length or are empty.
    """
    if len(candidates) != len(references) or not references:
        raise ValueError(f"need as many candidates as references, and at least one "
                         f"(got {len(candidates)} and {len(references)})")
    pairs = list(zip(candidates, references))
    return {
        "rouge_l": sum(rouge_l(c, r) for c, r in pairs) / len(pairs),
        "exact_match": sum(exact_match(c, r) for c, r in pairs) / len(pairs),
    }
