"""Fingerprint of everything that determines the token shards: the recipe's [data] and [tokenizer] sections
and the sources themselves.

`lm2 tokenize` stores the fingerprint and its inputs in meta.json; running again with the same fingerprint
does nothing, and `TokenShards.check_matches` refuses shards whose fingerprint differs from the recipe's.
Keeping the inputs (not only their hash) lets the stale-data message name what changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from lm2cli.fileio import sha256_file

# Bump when the shard layout (or the built-in corpus layout) changes: old shards then become stale instead of
# silently mismatching. The generator and the filler carry their own versions, which are fingerprinted too.
SHARD_FORMAT_VERSION = 1

# Sources totalling up to this size are fingerprinted by content (a `touch` does not force a rebuild); larger
# ones by size and modification time, so checking a 100 GB corpus at every `lm2 pretrain` stays instant.
CONTENT_HASH_LIMIT = 64 << 20

# [data] keys that never change the shards' content: where they go and how many processes encode them
# (the output is identical for any worker count; a test checks it).
_DATA_KEYS_BY_SOURCE = {
    "builtin": ["builtin_tasks", "builtin_stories", "builtin_filler", "builtin_repeat"],
    "files": ["files", "text_field", "text_unit", "on_decode_error"],
    "hub": ["hub_name", "hub_config", "hub_split", "hub_revision", "hub_streaming", "hub_max_docs", "text_field"],
}
_TOKENIZER_TRAINING_KEYS = ["type", "vocab_size", "byte_fallback", "character_coverage", "sample_sentences"]


def file_signature(path: Path, by_content: bool | None = None) -> dict[str, Any]:
    st = path.stat()
    if by_content is None:
        by_content = st.st_size <= CONTENT_HASH_LIMIT
    if by_content:
        return {"path": str(path), "size": st.st_size, "sha256": sha256_file(path)}
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def files_signature(paths: list[Path]) -> list[dict[str, Any]]:
    by_content = sum(p.stat().st_size for p in paths) <= CONTENT_HASH_LIMIT
    return [file_signature(p, by_content) for p in paths]


def fingerprint_inputs(recipe) -> dict[str, Any]:
    """The JSON-able description that is hashed into the fingerprint."""
    from lm2cli.data.files import resolve_files

    data = dataclasses.asdict(recipe.data)
    tok = dataclasses.asdict(recipe.tokenizer)
    relevant = ["source", "val_fraction", "seed", *_DATA_KEYS_BY_SOURCE[data["source"]]]
    inputs: dict[str, Any] = {
        "format": SHARD_FORMAT_VERSION,
        "data": {k: data[k] for k in relevant},
        "tokenizer": {"answer_token": tok["answer_token"], "extra_symbols": tok["extra_symbols"]},
    }
    if tok["path"]:
        model = Path(tok["path"])
        inputs["tokenizer"]["reuse"] = file_signature(model.resolve()) if model.is_file() else {"path": str(model)}
    else:
        inputs["tokenizer"].update({k: tok[k] for k in _TOKENIZER_TRAINING_KEYS})
    if data["source"] == "builtin":
        from lm2cli.data.corpus import BUILTIN_LAYOUT_VERSION
        from lm2cli.data.filler import FILLER_VERSION
        from lm2cli.data.stories import GENERATOR_VERSION

        inputs["sources"] = {"generator_version": GENERATOR_VERSION, "filler_version": FILLER_VERSION,
                             "layout_version": BUILTIN_LAYOUT_VERSION}
    elif data["source"] == "files":
        inputs["sources"] = files_signature(resolve_files(data["files"]))
    else:
        # A hub dataset cannot be fingerprinted offline beyond its coordinates; pin hub_revision to make the
        # fingerprint mean "the same data".
        inputs["sources"] = {"hub": data["hub_name"], "revision": data["hub_revision"] or "latest"}
    return inputs


def fingerprint_of(inputs: dict[str, Any]) -> str:
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """A short, human-readable list of what differs between two fingerprint inputs."""
    changes = []
    for section in ("format", "data", "tokenizer", "sources"):
        a, b = old.get(section), new.get(section)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and section in ("data", "tokenizer"):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    if key == "reuse":
                        changes.append("the tokenizer.path model file")
                    else:
                        changes.append(f"{section}.{key} ({_short(a.get(key))} -> {_short(b.get(key))})")
        elif section == "sources" and isinstance(a, list) and isinstance(b, list):
            old_files = {f["path"]: f for f in a}
            new_files = {f["path"]: f for f in b}
            added = [p for p in new_files if p not in old_files]
            removed = [p for p in old_files if p not in new_files]
            modified = [p for p in new_files if p in old_files and new_files[p] != old_files[p]]
            for label, paths in (("added", added), ("removed", removed), ("modified", modified)):
                if paths:
                    more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
                    changes.append(f"{label} source file {paths[0]}{more}")
        else:
            changes.append("the shard format" if section == "format" else f"the {section}")
    return ", ".join(changes) or "the fingerprint"


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
