"""A crafted memory_state.safetensors must never choose what code runs (issue 9, item 1).

The attacker controls every byte of the checkpoint, manifest included, so each payload below is written with a
matching manifest: the refusal has to come from decoding, not from the checksum.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lm2cli.errors import Lm2Error
from lm2cli.fileio import sha256_file
from lm2cli.training import checkpoints as ck

CARRY = ("train.steps=2", "train.eval_every=0", "train.eval_batches=1", "memory.carry=true")


def forge(ckpt: Path, tensors: dict[str, torch.Tensor], meta) -> None:
    """Replace the checkpoint's memory_state.safetensors and re-sign the manifest, as an attacker would."""
    path = ckpt / ck.MEMORY_FILE
    save_file(tensors, str(path), metadata={"lm2": meta if isinstance(meta, str) else json.dumps(meta)})
    state = json.loads((ckpt / ck.STATE_FILE).read_text())
    state["manifest"][ck.MEMORY_FILE] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    (ckpt / ck.STATE_FILE).write_text(json.dumps(state))


def old_skeleton(dataclass_name: str, fields: dict) -> dict:
    """The skeleton format of lm2 <= 0.x (`flatten_tree`): a list with one node per rank."""
    return {"list": [{"dataclass": dataclass_name, "fields": fields}]}


@pytest.fixture
def carried_run(cli, tiny_args, tmp_path):
    """A finished 2-step run with memory.carry = true (so --resume reads memory_state.safetensors)."""
    assert cli("pretrain", *tiny_args(*CARRY)).code == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert (ckpt / ck.MEMORY_FILE).is_file()
    return ckpt


def resume(cli, tiny_args):
    return cli("pretrain", *tiny_args(*CARRY[1:], "train.steps=3"), "--resume")


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("target", [
    "lm2cli.training.checkpoints:os.system",  # the reported exploit: passes an `lm2cli.` prefix check
    "lm2cli.fileio:os.system",  # another module's attribute
    "lm2cli.training.checkpoints:os.path.os.system",  # a nested path
])
def test_code_execution_payload_is_refused_and_nothing_runs(cli, tiny_args, carried_run, tmp_path, target):
    marker = tmp_path / "pwned"
    forge(carried_run, {"t0": torch.zeros(1)}, old_skeleton(target, {"command": {"value": f"touch {marker}"}}))
    res = resume(cli, tiny_args)
    assert not marker.exists(), "the checkpoint ran a shell command"
    assert res.code == 2
    line = one_error_line(res.err)
    assert str(carried_run) in line and ck.MEMORY_FILE in line


# ------------------------------------------------------------------ the decoder, payload by payload


def small_model(arch="lm2", layers="all"):
    from lm2cli import build_model, load_recipe

    recipe = load_recipe(None, ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "memory.slots=4",
                                "memory.heads=2", "memory.segment_len=8", "model.vocab_size=50",
                                f"model.arch={arch}", f"memory.layers={json.dumps(layers)}"])
    torch.manual_seed(0)
    return build_model(recipe)


def carried_states(model, ranks=1, batch=3):
    states = []
    for r in range(ranks):
        torch.manual_seed(r)
        _, state = model(torch.randint(0, 50, (batch, 20)))
        states.append(model.carry_memory(state))
    return states


def write(tmp_path, tensors, meta) -> Path:
    save_file(tensors, str(tmp_path / ck.MEMORY_FILE),
              metadata=None if meta is None else {"lm2": meta if isinstance(meta, str) else json.dumps(meta)})
    return tmp_path


def legacy(model, states) -> tuple[dict, dict]:
    """A memory file exactly as lm2 wrote it before the named-tensor format (captured from that version)."""
    tensors, ranks = {}, []
    for state in states:
        layers = []
        for ls in state.layers:
            memory = {"value": None}
            if ls.memory is not None:
                key = f"t{len(tensors)}"
                tensors[key] = ls.memory.bank.contiguous().clone()
                memory = {"dataclass": "lm2cli.model.memory:MemoryState", "fields": {
                    "bank": {"tensor": key}, "pending_queries": {"tuple": []}, "pending_contents": {"tuple": []},
                    "pending_len": {"value": 0}, "keys": {"value": None}, "values": {"value": None}}}
            layers.append({"dataclass": "lm2cli.model.model:LayerState",
                           "fields": {"k": {"value": None}, "v": {"value": None}, "memory": memory}})
        rmt = {"value": None}
        if state.rmt_memory is not None:
            rmt = {"tensor": f"t{len(tensors)}"}
            tensors[rmt["tensor"]] = state.rmt_memory.contiguous().clone()
        ranks.append({"dataclass": "lm2cli.model.model:ModelState", "fields": {
            "pos": {"value": 0}, "layers": {"list": layers}, "rmt_memory": rmt, "rmt_seg_len": {"value": 0}}})
    return tensors, {"list": ranks}


def same_state(a, b) -> bool:
    banks = [(x.memory.bank, y.memory.bank) for x, y in zip(a.layers, b.layers, strict=True) if x.memory]
    rmt = [(a.rmt_memory, b.rmt_memory)] if a.rmt_memory is not None else []
    return a.pos == b.pos == 0 and all(torch.equal(x, y) for x, y in banks + rmt)


@pytest.mark.parametrize("arch,layers", [("lm2", "all"), ("lm2", [1]), ("rmt", "all")])
def test_carried_memory_round_trips_through_the_model(tmp_path, arch, layers):
    from lm2cli.checkpoint import encode_carried_memory, read_carried_memory

    model = small_model(arch, layers)
    states = carried_states(model, ranks=2)
    carried = read_carried_memory(write(tmp_path, *encode_carried_memory(model, states, 3)), model)
    assert (carried.ranks, carried.batch_size) == (2, 3)
    for r in range(2):
        assert same_state(carried.state_for(model, r), states[r])


@pytest.mark.parametrize("arch,layers", [("lm2", "all"), ("lm2", [1]), ("rmt", "all"), ("vanilla", "all")])
def test_legacy_skeleton_is_read_through_the_fixed_table(tmp_path, arch, layers):
    from lm2cli.checkpoint import read_carried_memory

    model = small_model(arch, layers)
    states = carried_states(model, ranks=2)
    carried = read_carried_memory(write(tmp_path, *legacy(model, states)), model)
    assert carried.ranks == 2
    if arch != "vanilla":
        assert carried.batch_size == 3
        assert all(same_state(carried.state_for(model, r), states[r]) for r in range(2))


def legacy_variants(tensors, skel, marker):
    """(label, tensors, skeleton) of hostile or broken legacy files, each derived from a valid one."""
    boom = {"command": {"value": f"touch {marker}"}}

    def edit(fn):
        s = json.loads(json.dumps(skel))
        fn(s)
        return s

    rank0 = ("list", 0, "fields")
    layer0 = ("layers", "list", 0)

    def at(s, *path):
        for p in path:
            s = s[p]
        return s

    yield "exploit", tensors, {"list": [{"dataclass": "lm2cli.training.checkpoints:os.system", "fields": boom}]}
    yield "other module", tensors, {"list": [{"dataclass": "lm2cli.cli:os.system", "fields": boom}]}
    yield "lm2 class not in the table", tensors, edit(lambda s: at(s, "list")[0].update(
        dataclass="lm2cli.model.model:LanguageModel"))
    yield "nested qualname", tensors, edit(lambda s: at(s, "list")[0].update(
        dataclass="lm2cli.model.model:ModelState.detach"))
    yield "nested payload", tensors, edit(lambda s: at(s, *rank0, *layer0).update(
        dataclass="lm2cli.training.checkpoints:os.system", fields=boom))
    yield "payload as memory", tensors, edit(lambda s: at(s, *rank0, *layer0, "fields").update(
        memory={"dataclass": "lm2cli.model.memory:os.system", "fields": boom}))
    yield "unknown field", tensors, edit(lambda s: at(s, *rank0).update(evil={"value": 1}))
    yield "unknown field deeper", tensors, edit(lambda s: at(s, *rank0, *layer0, "fields", "memory", "fields")
                                                .update(command={"value": "x"}))
    yield "wrong type pos", tensors, edit(lambda s: at(s, *rank0).update(pos={"value": "x"}))
    yield "position not 0", tensors, edit(lambda s: at(s, *rank0).update(pos={"value": 5}))
    yield "layers as dict", tensors, edit(lambda s: at(s, *rank0).update(layers={"dict": {}}))
    yield "bank as number", tensors, edit(lambda s: at(s, *rank0, *layer0, "fields", "memory", "fields").update(
        bank={"value": 3}))
    yield "pending tokens", tensors, edit(lambda s: at(s, *rank0, *layer0, "fields", "memory", "fields").update(
        pending_len={"value": 5}))
    yield "cache present", tensors, edit(lambda s: at(s, *rank0, *layer0, "fields").update(k={"tensor": "t0"}))
    yield "tensor named twice", tensors, edit(lambda s: at(s, *rank0, "layers", "list", 1, "fields", "memory",
                                                          "fields").update(bank={"tensor": "t0"}))
    yield "unknown tensor", tensors, edit(lambda s: at(s, *rank0, *layer0, "fields", "memory", "fields").update(
        bank={"tensor": "nope"}))
    yield "not a list", tensors, {"list": {"a": 1}}
    yield "extra top-level key", tensors, dict(skel, dataclass="os:system")
    yield "wrong shape", {k: torch.zeros(3, 5, 32) for k in tensors}, skel
    yield "wrong dtype", {k: v.double() for k, v in tensors.items()}, skel
    yield "non-finite", {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, skel
    yield "tensor missing", {"t0": tensors["t0"]}, skel


def test_every_hostile_legacy_file_is_refused_by_name(tmp_path):
    from lm2cli.checkpoint import read_carried_memory

    model = small_model()
    tensors, skel = legacy(model, carried_states(model))
    marker = tmp_path / "pwned"
    refused = []
    for label, t, s in legacy_variants(tensors, skel, marker):
        with pytest.raises(Lm2Error) as err:
            read_carried_memory(write(tmp_path, t, s), model)
        msg = str(err.value)
        assert str(tmp_path / ck.MEMORY_FILE) in msg and "\n" not in msg, (label, msg)
        refused.append(label)
    assert not marker.exists()
    assert len(refused) == 22


def new_variants(tensors, desc):
    yield "no description", tensors, None
    yield "description not JSON", tensors, "{not json"
    yield "deeply nested JSON", tensors, "[" * 100_000
    yield "description a list", tensors, [desc]
    yield "unknown key", tensors, dict(desc, dataclass="lm2cli.training.checkpoints:os.system")
    yield "missing key", tensors, {k: v for k, v in desc.items() if k != "ranks"}
    yield "other version", tensors, dict(desc, version=2)
    yield "other arch", tensors, dict(desc, arch="rmt")
    yield "ranks a string", tensors, dict(desc, ranks="1")
    yield "ranks a bool", tensors, dict(desc, ranks=True)
    yield "ranks zero", tensors, dict(desc, ranks=0)
    yield "too many ranks", tensors, dict(desc, ranks=10**9)
    yield "batch wrong", tensors, dict(desc, batch_size=2)
    yield "extra tensor", dict(tensors, evil=torch.zeros(1)), desc
    yield "missing tensor", {k: v for k, v in tensors.items() if "block1" not in k}, desc
    yield "wrong shape", {k: v[:, :2].contiguous() for k, v in tensors.items()}, desc
    yield "int tensor", {k: v.long() for k, v in tensors.items()}, desc
    yield "bf16 bank", {k: v.bfloat16() for k, v in tensors.items()}, desc
    yield "infinite", {k: torch.full_like(v, float("inf")) for k, v in tensors.items()}, desc


def test_every_broken_named_tensor_file_is_refused_by_name(tmp_path):
    from lm2cli.checkpoint import encode_carried_memory, read_carried_memory

    model = small_model()
    tensors, desc = encode_carried_memory(model, carried_states(model), 3)
    n = 0
    for label, t, d in new_variants(tensors, desc):
        with pytest.raises(Lm2Error) as err:
            read_carried_memory(write(tmp_path, t, d), model)
        assert str(tmp_path / ck.MEMORY_FILE) in str(err.value), (label, str(err.value))
        n += 1
    (tmp_path / ck.MEMORY_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")  # truncated header
    with pytest.raises(Lm2Error, match="unreadable"):
        read_carried_memory(tmp_path, model)
    assert n == 19


def test_resume_from_a_legacy_memory_file_is_exact(cli, tiny_args, tmp_path, interrupted_at):
    """A checkpoint written before the named-tensor format still resumes exactly (through the fixed table)."""
    from lm2cli import build_model
    from lm2cli.checkpoint import load_recipe_of, read_carried_memory

    from .test_pretrain import metrics

    sets = ("train.steps=6", "train.save_every=3", "train.eval_every=0", "memory.carry=true")
    assert cli("pretrain", *tiny_args(*sets, out=tmp_path / "a")).code == 0
    with interrupted_at(4, 2):
        assert cli("pretrain", *tiny_args(*sets, out=tmp_path / "b")).code == 130
    ckpt = tmp_path / "b/checkpoints/step_00000004"
    model = build_model(load_recipe_of(ckpt))
    states = [read_carried_memory(ckpt, model).state_for(model, 0)]
    forge(ckpt, *legacy(model, states))
    res = cli("pretrain", *tiny_args(*sets, out=tmp_path / "b"), "--resume")
    assert res.code == 0, res.err
    strip = [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in metrics(tmp_path / "a")]
    assert strip == [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")}
                     for r in metrics(tmp_path / "b")]


def test_changed_batch_size_starts_the_carried_memory_fresh(cli, tiny_args, carried_run):
    res = cli("pretrain", *tiny_args(*CARRY[1:], "train.steps=3", "train.batch_size=2"), "--resume")
    assert res.code == 0, res.err
    assert "holds 4 rows per process, train.batch_size is now 2; it starts fresh" in res.err
