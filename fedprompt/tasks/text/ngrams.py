"""BDPL's candidate vocabulary: frequent n-grams of the task's texts, joined by pointwise mutual
information, as its reference code (``pmi_ngram.py``) builds them.

1. Words are the texts' whitespace-separated tokens, lower-cased. Count each word c(w) and each
   adjacent pair c(a, b) over all texts (N: the number of pairs); drop words and pairs seen
   ``min_count`` times or fewer.
2. A pair is strong when PMI(a, b) = log(N·c(a, b) / (c(a)·c(b))) ≥ ``min_pmi``.
3. Each text splits into n-grams at every adjacent pair that is not strong; n-grams of at most
   ``max_ngram`` words seen more than ``min_count`` times are kept.
4. The kept n-grams are recounted at every position of every text (an n-gram inside a longer one
   counts too) and those seen more than ``min_frequency`` times remain.
5. Ordered by that count (then by the n-gram, both descending, as the reference sorts), each
   loses its trailing non-alphanumeric characters; the first ``size`` distinct non-empty strings
   are the candidates.

The reference's first step also drops the split's last n-gram of each text (its loop never emits
it); this keeps it, so the texts' ends count like their other parts.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Sequence


def pmi_ngrams(
    texts: Iterable[str],
    size: int,
    *,
    max_ngram: int = 5,
    min_count: int = 5,
    min_pmi: float = 1.0,
    min_frequency: int = 5,
) -> list[str]:
    """The ``size`` most frequent PMI n-grams of ``texts`` (see the module docstring); fewer when
    the texts hold fewer."""
    sentences = [text.lower().split() for text in texts]
    sentences = [words for words in sentences if words]
    words: Counter[str] = Counter()
    pairs: Counter[tuple[str, str]] = Counter()
    for sentence in sentences:
        words.update(sentence)
        pairs.update(itertools.pairwise(sentence))
    total = sum(pairs.values())
    frequent_words = {w for w, c in words.items() if c > min_count}
    strong = {
        pair
        for pair, count in pairs.items()
        if count > min_count
        and pair[0] in frequent_words
        and pair[1] in frequent_words
        and math.log(total * count / (words[pair[0]] * words[pair[1]])) >= min_pmi
    }
    segments: Counter[tuple[str, ...]] = Counter()
    for sentence in sentences:
        current = [sentence[0]]
        for left, right in itertools.pairwise(sentence):
            if (left, right) in strong:
                current.append(right)
            else:
                segments[tuple(current)] += 1
                current = [right]
        segments[tuple(current)] += 1
    kept = {gram for gram, count in segments.items() if count > min_count and len(gram) <= max_ngram}
    recount: Counter[tuple[str, ...]] = Counter()
    for sentence in sentences:
        for start in range(len(sentence)):
            for n in range(1, max_ngram + 1):
                gram = tuple(sentence[start : start + n])
                if len(gram) < n:
                    break
                if gram in kept:
                    recount[gram] += 1
    ranked = sorted(((count, gram) for gram, count in recount.items() if count > min_frequency), reverse=True)
    return _distinct_strings((gram for _, gram in ranked), size)


def _distinct_strings(grams: Iterable[Sequence[str]], size: int) -> list[str]:
    out: list[str] = []
    for gram in grams:
        text = " ".join(gram)
        end = len(text)
        while end > 0 and not text[end - 1].isalnum():
            end -= 1
        text = text[:end]
        if text and text not in out:
            out.append(text)
            if len(out) == size:
                break
    return out
