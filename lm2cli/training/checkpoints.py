"""Training checkpoints: atomic directories, training state without pickles, rotation, pointers.

One directory per save, `checkpoints/step_XXXXXXXX/`, written as `step_XXXXXXXX.tmp/` and renamed, so a
directory without the `.tmp` suffix is always complete. Besides the inference files of the shared format
(`model.safetensors`, `recipe.toml`, `tokenizer.model`, written by `lm2cli.checkpoint.save_model_files`) it
holds what exact resume needs:

    trainer_state.json      step, data cursor, stage, best validation, RNG of python/numpy (per rank),
                            and a manifest (size + sha256 of every other file) to detect corruption
    optimizer.safetensors   AdamW moments and step counts, keyed `state/<param index or name>/<name>`; the
                            group layout is in the safetensors metadata (JSON)
    rng.safetensors         torch CPU (and CUDA) generator states per rank, as uint8 tensors
    memory_state.safetensors  the carried memory (memory.carry = true only): named tensors and a small JSON
                            description, decoded and checked against the model by lm2cli.checkpoint

Nothing is ever unpickled: tensors come from safetensors and everything else from JSON.
`latest` and `best` are small text files naming a checkpoint directory; rotation keeps the newest
`keep_last` checkpoints and every checkpoint a pointer names.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lm2cli.checkpoint import MEMORY_FILE
from lm2cli.errors import Lm2Error
from lm2cli.fileio import atomic_write_json, atomic_write_text, sha256_file

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FORMAT = "lm2-trainer-state"
STATE_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------------ pointers


def read_pointer(root: Path, pointer: str) -> str | None:
    """Checkpoint name stored in `root/pointer`, or None if the file or the directory it names is missing."""
    path = root / pointer
    if not path.is_file():
        return None
    name = path.read_text(encoding="utf-8").strip()
    return name if step_of(name) is not None and (root / name).is_dir() else None


def write_pointer(root: Path, pointer: str, name: str) -> None:
    atomic_write_text(root / pointer, name + "\n")


def list_checkpoints(root: Path) -> list[str]:
    """Complete checkpoint directories (no `.tmp`), oldest first."""
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None]
    return sorted(names, key=step_of)


def newest_checkpoint(root: Path) -> str | None:
    """The `latest` pointer if valid, else the highest-step directory (the pointer is written after the rename,
    so a crash in between leaves a complete directory newer than the pointer)."""
    names = list_checkpoints(root)
    pointed = read_pointer(root, "latest")
    if names and (pointed is None or step_of(names[-1]) > step_of(pointed)):
        return names[-1]
    return pointed


def remove_stale_tmp(root: Path) -> list[str]:
    """Delete `*.tmp` directories left by a run killed while saving; they are never valid checkpoints."""
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def rotate(root: Path, keep_last: int, protected: set[str]) -> list[str]:
    """Delete all but the newest `keep_last` checkpoints and those in `protected`; return what was deleted."""
    names = list_checkpoints(root)
    keep = set(names[-keep_last:]) | protected
    pointed = {read_pointer(root, p.name) for p in root.iterdir() if p.is_file()}
    deleted = []
    for name in names:
        if name not in keep and name not in pointed:
            shutil.rmtree(root / name, ignore_errors=True)
            deleted.append(name)
    return deleted


# -------------------------------------------------------------------------------------------- saving


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_checkpoint(root: Path, step: int, write_model_files: Callable[[Path], None], trainer_state: dict,
                    optimizer_state: dict | None, rng_tensors: dict[str, torch.Tensor],
                    memory_state: tuple[dict[str, torch.Tensor], dict] | None = None) -> Path:
    """Write checkpoint `step` atomically and point `latest` at it. Returns the final directory.

    `memory_state`: the carried memory as (tensors, description), from `lm2cli.checkpoint.encode_carried_memory`.

    If a complete checkpoint of the same step already exists (e.g. an interrupt right after a periodic
    save), it is kept as is: the state at a given step is the same by construction.
    """
    name = checkpoint_name(step)
    final = root / name
    if final.is_dir():
        write_pointer(root, "latest", name)
        return final
    tmp = root / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_model_files(tmp)
    if optimizer_state is not None:
        tensors, meta = flatten_optimizer_state(optimizer_state)
        save_file(tensors, tmp / OPTIMIZER_FILE, metadata={"lm2": json.dumps(meta)})
    save_file({k: v.contiguous() for k, v in rng_tensors.items()}, tmp / RNG_FILE)
    if memory_state is not None:
        tensors, description = memory_state
        save_file(tensors, tmp / MEMORY_FILE, metadata={"lm2": json.dumps(description)})
    state = dict(trainer_state, format=STATE_FORMAT, version=STATE_VERSION, manifest=_manifest(tmp))
    atomic_write_json(tmp / STATE_FILE, state)
    for f in tmp.iterdir():  # the rename must not become visible before the data is on disk
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, final)
    _fsync_dir(root)
    write_pointer(root, "latest", name)
    return final


def _manifest(directory: Path) -> dict[str, dict]:
    return {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
            for f in sorted(directory.iterdir()) if f.is_file() and f.name != STATE_FILE}


def update_trainer_state(ckpt: Path, **changes) -> dict:
    """Rewrite trainer_state.json of a finished checkpoint atomically (e.g. its validation result)."""
    state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    state.update(changes)
    atomic_write_json(ckpt / STATE_FILE, state)
    return state


# ------------------------------------------------------------------------------------------- loading


class CorruptCheckpoint(Lm2Error):
    pass


def _corrupt(ckpt: Path, what: str) -> CorruptCheckpoint:
    root = ckpt.parent
    older = [n for n in list_checkpoints(root) if step_of(n) < (step_of(ckpt.name) or 0)]
    hint = (f"; the previous checkpoint is {root / older[-1]} (resume from it with --resume-from "
            f"{root / older[-1]})" if older else "; no older checkpoint exists in that directory")
    return CorruptCheckpoint(f"checkpoint {ckpt} is corrupt or truncated ({what}){hint}")


def read_trainer_state(ckpt: Path, verify: bool = True) -> dict:
    """trainer_state.json of `ckpt`, after checking every file against the manifest."""
    path = ckpt / STATE_FILE
    if not path.is_file():
        raise _corrupt(ckpt, f"{STATE_FILE} is missing; it is not a training checkpoint")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(ckpt, f"{STATE_FILE}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise _corrupt(ckpt, f"{STATE_FILE} is not an lm2 trainer state")
    if state.get("version") != STATE_VERSION:
        raise Lm2Error(f"checkpoint {ckpt}: trainer state version {state.get('version')} is not supported by "
                       f"this lm2 (expects {STATE_VERSION})")
    if verify:
        for fname, info in state.get("manifest", {}).items():
            f = ckpt / fname
            if not f.is_file():
                raise _corrupt(ckpt, f"{fname} is missing")
            if f.stat().st_size != info["bytes"]:
                raise _corrupt(ckpt, f"{fname} has {f.stat().st_size} bytes, expected {info['bytes']}")
            if sha256_file(f) != info["sha256"]:
                raise _corrupt(ckpt, f"{fname} does not match its recorded sha256")
    return state


def load_safetensors(ckpt: Path, fname: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and lm2 metadata (JSON) of one safetensors file of a checkpoint, with corruption as Lm2Error."""
    from safetensors import safe_open

    path = ckpt / fname
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("lm2", "{}"))
        return load_file(str(path)), meta
    except (SafetensorError, OSError, json.JSONDecodeError, ValueError) as e:
        raise _corrupt(ckpt, f"{fname}: {str(e).splitlines()[0][:160]}") from None


# ------------------------------------------------------------------------------------- optimizer state


def flatten_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into safetensors tensors plus a JSON description of its groups.

    `sd` is `optimizer.state_dict()` (parameters keyed by index) or, under FSDP, the gathered full state dict
    (keyed by parameter name); the key kind is recorded so loading gives back the same keys.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for key, st in sd["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"state/{key}/{name}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars[f"{key}/{name}"] = value
    groups = [{"name": g.get("name", str(i)), "params": list(g["params"])} for i, g in enumerate(sd["param_groups"])]
    keys = "name" if any(isinstance(k, str) for k in sd["state"]) else "index"
    return tensors, {"groups": groups, "scalars": scalars, "keys": keys}


def read_optimizer_state(ckpt: Path) -> tuple[dict[Any, dict[str, Any]], dict]:
    """(per-parameter state, metadata) of a checkpoint's optimizer.safetensors."""
    tensors, meta = load_safetensors(ckpt, OPTIMIZER_FILE)
    by_index = meta.get("keys", "index") == "index"
    state: dict[Any, dict[str, Any]] = {}
    items = [(k.split("/", 2)[1:], v) for k, v in tensors.items()]
    items += [(k.rsplit("/", 1), v) for k, v in meta.get("scalars", {}).items()]
    for (key, name), value in items:
        state.setdefault(int(key) if by_index else key, {})[name] = value
    return state, meta


def optimizer_param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order (its state dict keys parameters by this position)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


def rekey(state: dict, names: list[str], by_name: bool) -> dict:
    """Convert optimizer state keys between positions and names (an FSDP checkpoint resumed without FSDP, or
    the other way round)."""
    if by_name:
        return {names[k] if isinstance(k, int) else k: v for k, v in state.items()}
    index = {n: i for i, n in enumerate(names)}
    return {index[k] if isinstance(k, str) else k: v for k, v in state.items()}


def load_optimizer_state(optimizer: torch.optim.Optimizer, ckpt: Path, names: list[str] | None = None) -> None:
    """Restore moments and step counts into `optimizer`, whose groups were built from the current recipe.

    Group hyperparameters (betas, weight decay, lr multipliers) stay as the current recipe sets them; only
    the state tensors come from the checkpoint, after checking that the parameter layout is the same.
    `names` (parameter names in optimizer order) lets a name-keyed (FSDP) checkpoint load.
    """
    state, meta = read_optimizer_state(ckpt)
    current = optimizer.state_dict()
    check_group_layout(ckpt, meta, [(g.get("name", str(i)), len(g["params"]))
                                    for i, g in enumerate(current["param_groups"])])
    if names is not None:
        state = rekey(state, names, by_name=False)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, st in state.items():
        if not isinstance(idx, int) or not 0 <= idx < len(params):
            raise _corrupt(ckpt, f"optimizer state for an unknown parameter {idx!r}")
        for name, value in st.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != params[idx].shape:
                raise _corrupt(ckpt, f"optimizer tensor {name} of parameter {idx} has shape "
                                     f"{tuple(value.shape)}, the parameter {tuple(params[idx].shape)}")
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def check_group_layout(ckpt: Path, meta: dict, layout_now: list[tuple[str, int]]) -> None:
    layout_then = [(g["name"], len(g["params"])) for g in meta.get("groups", [])]
    if layout_now != layout_then:
        raise Lm2Error(f"checkpoint {ckpt}: its optimizer groups {layout_then} do not match this run's "
                       f"{layout_now}; the model's parameters changed (see the recipe differences above)")


# ----------------------------------------------------------------------------------------------- RNG


def capture_rng(rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states: torch (CPU and CUDA) as uint8 tensors; python's and numpy's Mersenne
    Twister states as JSON (the 624-word key as a hex string, so trainer_state.json stays readable)."""
    tensors = {f"rank{rank}.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rank{rank}.cuda{i}"] = s
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    info = {"python": {"version": version, "key": np.asarray(internal[:-1], "<u4").tobytes().hex(),
                       "pos": internal[-1], "gauss": gauss},
            "numpy": {"name": np_name, "key": np.asarray(np_keys, "<u4").tobytes().hex(), "pos": int(np_pos),
                      "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)}}
    return tensors, info


def restore_rng(rank: int, tensors: dict[str, torch.Tensor], info: dict) -> None:
    torch.set_rng_state(tensors[f"rank{rank}.torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith(f"rank{rank}.cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    py = info["python"]
    key = np.frombuffer(bytes.fromhex(py["key"]), "<u4").tolist()
    random.setstate((py["version"], (*key, py["pos"]), py["gauss"]))
    n = info["numpy"]
    np.random.set_state((n["name"], np.frombuffer(bytes.fromhex(n["key"]), "<u4").astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
