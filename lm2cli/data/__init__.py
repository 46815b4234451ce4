"""Data for lm2: the SentencePiece tokenizer, token shards, the built-in bAbI-world corpus and BABILong sets.

Public entry points (see docs/internals.md and docs/data.md):

    Tokenizer          lm2cli.data.tokenizer   load / from_bytes / encode / decode, fixed special ids
    TokenShards        lm2cli.data.shards      read-only memmap view of `lm2 tokenize` output
    tokenize_command   lm2cli.data.prepare     `lm2 tokenize RECIPE`
    babilong_command   lm2cli.data.babilong    `lm2 babilong RECIPE`
    load_babilong      lm2cli.data.babilong    rows of a BABILong set (local directory or hub name)
"""

from __future__ import annotations

__all__ = ["Tokenizer", "TokenShards", "tokenize_command", "babilong_command", "load_babilong"]


def __getattr__(name: str):
    # Lazy, so `import lm2cli.data` stays cheap (no sentencepiece/datasets import until needed).
    if name == "Tokenizer":
        from lm2cli.data.tokenizer import Tokenizer

        return Tokenizer
    if name == "TokenShards":
        from lm2cli.data.shards import TokenShards

        return TokenShards
    if name == "tokenize_command":
        from lm2cli.data.prepare import tokenize_command

        return tokenize_command
    if name in ("babilong_command", "load_babilong"):
        from lm2cli.data import babilong

        return getattr(babilong, name)
    raise AttributeError(f"module 'lm2cli.data' has no attribute {name!r}")
