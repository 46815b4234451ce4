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
import math
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from lm2cli import checkpoint as layout
from lm2cli.checkpoint import MEMORY_FILE, STATE_FILE, CorruptCheckpoint
from lm2cli.errors import Lm2Error
from lm2cli.fileio import atomic_write_json, atomic_write_text, remove_stale_temp_files

OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
RESUME_FROM = "resume from it with --resume-from {path}"


# ------------------------------------------------------------------------------------------ pointers


def write_pointer(root: Path, pointer: str, name: str) -> None:
    atomic_write_text(root / pointer, name + "\n")


def remove_stale_tmp(root: Path) -> list[str]:
    """Delete what a run killed while saving leaves behind: `step_*.tmp` directories (never valid checkpoints)
    and half-written pointer files (`.latest.*.tmp`), which rotation would otherwise have to step around."""
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        removed += remove_stale_temp_files(root)
    return sorted(removed)


def rotate(root: Path, keep_last: int, protected: set[str]) -> list[str]:
    """Delete all but the newest `keep_last` checkpoints and those in `protected`; return what was deleted."""
    names = layout.list_checkpoints(root)
    keep = set(names[-keep_last:]) | protected
    pointed = {layout.read_pointer(root, p.name) for p in root.iterdir() if layout.is_pointer_name(p.name)}
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
    name = layout.checkpoint_name(step)
    final = root / name
    if final.is_dir():
        write_pointer(root, layout.LATEST, name)
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
    layout.write_state_file(tmp, trainer_state)
    for f in tmp.iterdir():  # the rename must not become visible before the data is on disk
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, final)
    _fsync_dir(root)
    write_pointer(root, layout.LATEST, name)
    return final


def update_trainer_state(ckpt: Path, **changes) -> dict:
    """Rewrite trainer_state.json of a finished checkpoint atomically (e.g. its validation result)."""
    state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    state.update(changes)
    atomic_write_json(ckpt / STATE_FILE, state)
    return state


# ------------------------------------------------------------------------------------------- loading


def _corrupt(ckpt: Path, what: str) -> CorruptCheckpoint:
    return layout.corrupt(ckpt, what, RESUME_FROM)


def read_trainer_state(ckpt: Path, verify: bool = True, checksums: bool = True) -> dict:
    """trainer_state.json of `ckpt`, after checking every file against the manifest (sizes always, sha256
    unless `checksums` is False) and the state against its schema."""
    if verify:
        state = layout.verify_checkpoint(ckpt, checksums, needed=(*layout.INFERENCE_FILES, OPTIMIZER_FILE, RNG_FILE),
                                  use_previous=RESUME_FROM)
    else:
        state = layout.read_state_file(ckpt, RESUME_FROM)
    problem = trainer_state_problem(state)
    if problem:
        raise _corrupt(ckpt, f"{STATE_FILE}: {problem}")
    if verify and state["memory_carried"] and MEMORY_FILE not in state["manifest"]:
        raise _corrupt(ckpt, f"{MEMORY_FILE} is not in the manifest of {STATE_FILE}")
    return state


def _is_int(x: Any, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


_MT_KEY_HEX = 624 * 8  # a Mersenne Twister state: 624 32-bit words, as hex


def _rng_problem(info: Any) -> str | None:
    if not isinstance(info, dict) or not isinstance(info.get("python"), dict) or not isinstance(info.get("numpy"),
                                                                                              dict):
        return "expected {\"python\": {...}, \"numpy\": {...}}"
    py, nps = info["python"], info["numpy"]
    for where, d in (("python", py), ("numpy", nps)):
        key = d.get("key")
        if not isinstance(key, str) or len(key) != _MT_KEY_HEX or not re.fullmatch(r"[0-9a-f]*", key):
            return f"{where}.key must be {_MT_KEY_HEX} hex digits"
        if not _is_int(d.get("pos")) or d["pos"] > 624:
            return f"{where}.pos must be an integer from 0 to 624"
    if not _is_int(py.get("version")) or not (py.get("gauss") is None or _is_number(py["gauss"])):
        return "python.version must be an integer and python.gauss a number or null"
    if nps.get("name") != "MT19937" or nps.get("has_gauss") not in (0, 1) or not _is_number(nps.get("gauss")):
        return "numpy must be an MT19937 state with has_gauss 0 or 1 and a numeric gauss"
    return None


def trainer_state_problem(state: dict) -> str | None:
    """What is wrong with a trainer_state.json (already known to be an lm2 trainer state), or None.

    Every value restore() uses is checked here, so a hand-edited file gives one line, never a KeyError."""
    if state.get("command") not in ("pretrain", "finetune"):
        return f"command = {json.dumps(state.get('command'))[:40]}, expected \"pretrain\" or \"finetune\""
    for key, low in (("step", 0), ("rows_done", 0), ("stage", 0), ("world_size", 1)):
        if not _is_int(state.get(key), low):
            return f"{key} = {json.dumps(state.get(key))[:40]}, expected an integer >= {low}"
    for key in ("eval_pending", "memory_carried"):
        if not isinstance(state.get(key), bool):
            return f"{key} = {json.dumps(state.get(key))[:40]}, expected true or false"
    if not _is_number(state.get("train_seconds", 0.0)) or state.get("train_seconds", 0.0) < 0:
        return "train_seconds must be a number >= 0"
    for key in ("tokenizer_sha256", "data_fingerprint"):
        if state.get(key) is not None and not isinstance(state[key], str):
            return f"{key} must be a string"
    best = state.get("best") or {}
    if not isinstance(best, dict):
        return "best must be an object {pointer: {val_loss, checkpoint}}"
    for pointer, entry in best.items():
        if (not layout.is_pointer_name(pointer) or not isinstance(entry, dict) or not _is_number(entry.get("val_loss"))
                or not isinstance(entry.get("checkpoint"), str) or layout.step_of(entry["checkpoint"]) is None):
            return f"best.{pointer[:40]} must be {{\"val_loss\": <number>, \"checkpoint\": \"step_XXXXXXXX\"}}"
    rng = state.get("rng")
    if not isinstance(rng, dict):
        return "rng must be an object with one entry per process"
    for rank in range(state["world_size"]):
        problem = _rng_problem(rng.get(f"rank{rank}"))
        if problem:
            return f"rng.rank{rank}: {problem}"
    return None


def load_safetensors(ckpt: Path, fname: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and lm2 metadata (JSON) of one safetensors file of a checkpoint, with corruption as Lm2Error."""
    tensors, raw = layout.read_safetensors(ckpt / fname, lambda what: _corrupt(ckpt, f"{fname}: {what}"))
    try:
        return tensors, json.loads(raw or "{}")
    except (ValueError, RecursionError):
        raise _corrupt(ckpt, f"{fname}: its metadata is not JSON") from None


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


ADAM_STATE = {"step", "exp_avg", "exp_avg_sq"}  # what AdamW keeps per parameter (max_exp_avg_sq with amsgrad)
_PARAM_KEY = re.compile(r"^[A-Za-z0-9_.]{1,300}$")


def _optimizer_meta_problem(meta: Any) -> str | None:
    if not isinstance(meta, dict) or meta.get("keys", "index") not in ("index", "name"):
        return "its metadata is not an lm2 optimizer description"
    groups = meta.get("groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("name"), str)
                                               and isinstance(g.get("params"), list) for g in groups):
        return "its metadata lacks the parameter groups ([{\"name\", \"params\"}, ...])"
    scalars = meta.get("scalars", {})
    if not isinstance(scalars, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                for v in scalars.values()):
        return "its scalars are not numbers"
    return None


def read_optimizer_state(ckpt: Path) -> tuple[dict[Any, dict[str, Any]], dict]:
    """(per-parameter state, metadata) of a checkpoint's optimizer.safetensors, every name and value checked."""
    tensors, meta = load_safetensors(ckpt, OPTIMIZER_FILE)
    problem = _optimizer_meta_problem(meta)
    if problem:
        raise _corrupt(ckpt, f"{OPTIMIZER_FILE}: {problem}")
    by_index = meta.get("keys", "index") == "index"
    state: dict[Any, dict[str, Any]] = {}
    items = [(k.split("/"), v) for k, v in tensors.items()]
    items += [(["state", *k.rsplit("/", 1)], v) for k, v in meta.get("scalars", {}).items()]
    for parts, value in items:
        ok = (len(parts) == 3 and parts[0] == "state" and parts[2] in ADAM_STATE | {"max_exp_avg_sq"}
              and (parts[1].isdigit() if by_index else bool(_PARAM_KEY.match(parts[1]))))
        if not ok:
            raise _corrupt(ckpt, f"{OPTIMIZER_FILE}: unexpected entry {'/'.join(parts)[:80]!r}")
        if torch.is_tensor(value) and (not value.is_floating_point() or not bool(torch.isfinite(value).all())):
            raise _corrupt(ckpt, f"{OPTIMIZER_FILE}: {'/'.join(parts)} is not a finite floating-point tensor")
        state.setdefault(int(parts[1]) if by_index else parts[1], {})[parts[2]] = value
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
        if not ADAM_STATE <= set(st):
            raise _corrupt(ckpt, f"optimizer state of parameter {idx} lacks {', '.join(sorted(ADAM_STATE - set(st)))}")
        for name, value in st.items():
            want = () if name == "step" else tuple(params[idx].shape)
            if torch.is_tensor(value) and tuple(value.shape) != want:
                raise _corrupt(ckpt, f"optimizer tensor {name} of parameter {idx} has shape "
                                     f"{tuple(value.shape)}, the parameter {want}")
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


def restore_rng(rank: int, tensors: dict[str, torch.Tensor], info: dict, ckpt: Path | None = None) -> None:
    """Set this process's RNGs from a checkpoint's rng.safetensors tensors and trainer-state `info` (already
    checked against the schema); a tensor that is not a generator state is refused, naming `ckpt`."""

    def bad(what: str) -> Lm2Error:
        return _corrupt(ckpt, f"{RNG_FILE}: {what}") if ckpt is not None else Lm2Error(f"{RNG_FILE}: {what}")

    cpu = tensors.get(f"rank{rank}.torch_cpu")
    want = torch.get_rng_state()
    if cpu is None or cpu.dtype != torch.uint8 or cpu.shape != want.shape:
        raise bad(f"rank{rank}.torch_cpu is not a torch generator state ({want.numel()} bytes)")
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith(f"rank{rank}.cuda")]
    if cuda and torch.cuda.is_available():
        cuda = cuda[: torch.cuda.device_count()]
        want_cuda = torch.cuda.get_rng_state(0)
        if any(c.dtype != torch.uint8 or c.shape != want_cuda.shape for c in cuda):
            raise bad(f"rank{rank}.cuda* are not CUDA generator states")
    try:
        torch.set_rng_state(cpu)
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        _restore_python_numpy(info)
    except (ValueError, TypeError, RuntimeError) as e:
        raise bad(f"a generator state was refused ({str(e)[:100]})") from None


def _restore_python_numpy(info: dict) -> None:
    py = info["python"]
    key = np.frombuffer(bytes.fromhex(py["key"]), "<u4").tolist()
    random.setstate((py["version"], (*key, py["pos"]), py["gauss"]))
    n = info["numpy"]
    np.random.set_state((n["name"], np.frombuffer(bytes.fromhex(n["key"]), "<u4").astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
