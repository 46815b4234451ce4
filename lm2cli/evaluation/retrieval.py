"""The retrieval baseline (the paper's RAG row): keep the k context sentences that best match the question.

`eval.retrieval = "bm25"` scores every sentence of a sample's context against its question with BM25 (the
`bm25s` library, extra "retrieval"), keeps the `eval.retrieval_k` best, in their original order, and feeds only
those to the model. Sentences are split the way the BABILong builder splits haystack text.
"""

from __future__ import annotations

import numpy as np

from lm2cli.errors import Lm2Error


def require_bm25():
    try:
        import bm25s
    except ImportError:
        raise Lm2Error('eval.retrieval = "bm25" needs the bm25s package: pip install "lm2[retrieval]" (or pip '
                       'install bm25s)') from None
    return bm25s


def top_sentences(context: str, question: str, k: int) -> str:
    """The k sentences of `context` with the highest BM25 score for `question`, in context order, joined by
    single spaces (all of them when there are at most k)."""
    from lm2cli.data.haystack import split_sentences

    bm25s = require_bm25()
    sentences = split_sentences(context)
    if len(sentences) <= k:
        return " ".join(sentences)
    corpus = bm25s.tokenize(sentences, stopwords="en", return_ids=False, show_progress=False)
    query = bm25s.tokenize(question, stopwords="en", return_ids=False, show_progress=False)[0]
    retriever = bm25s.BM25()
    retriever.index(corpus, show_progress=False)
    scores = retriever.get_scores(query) if query else np.zeros(len(sentences))
    best = np.argsort(-np.asarray(scores), kind="stable")[:k]  # ties: the earlier sentence
    return " ".join(sentences[i] for i in sorted(best.tolist()))


def retrieved_row(row: dict, k: int) -> dict:
    """A BABILong row whose input is reduced to its k best-matching sentences."""
    return dict(row, input=top_sentences(row["input"], row["question"], k))
