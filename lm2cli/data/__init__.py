"""Data for lm2: the SentencePiece tokenizer, token shards, the built-in bAbI-world corpus and BABILong sets.

Public entry points (see docs/internals.md and docs/data.md):

    Tokenizer          lm2cli.data.tokenizer   load / from_bytes / encode / decode, fixed special ids
    TokenShards        lm2cli.data.shards      read-only memmap view of `lm2 tokenize` output
    tokenize_command   lm2cli.data.prepare     `lm2 tokenize RECIPE`
    babilong_command   lm2cli.data.babilong    `lm2 babilong RECIPE`
    load_babilong      lm2cli.data.babilong    rows of a BABILong set (local directory or hub name)
"""

from __future__ import annotations

from lm2cli.lazy import lazy_exports

__all__ = ["Tokenizer", "TokenShards", "tokenize_command", "babilong_command", "load_babilong"]

# Lazy, so `import lm2cli.data` stays cheap (no sentencepiece/datasets import until needed).
__getattr__ = lazy_exports(__name__, {"Tokenizer": "lm2cli.data.tokenizer", "TokenShards": "lm2cli.data.shards",
                                      "tokenize_command": "lm2cli.data.prepare",
                                      "babilong_command": "lm2cli.data.babilong",
                                      "load_babilong": "lm2cli.data.babilong"})
