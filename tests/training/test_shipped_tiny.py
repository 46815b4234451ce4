"""The shipped tiny recipe through the real pipeline: lm2 tokenize -> pretrain (dry run, then a short run)
-> lm2 babilong (train side) -> finetune with a two-stage curriculum from the pretrained run."""

from __future__ import annotations

import json

import pytest

from .conftest import TINY
from .test_finetune import greedy_exact_match, validation_rows


def test_tiny_recipe_tokenize_pretrain_babilong_finetune(cli, tmp_path):
    data, run, sets, ft = tmp_path / "data", tmp_path / "run", tmp_path / "babilong", tmp_path / "ft"
    assert cli("tokenize", TINY, "--out", data).code == 0
    with_data = ["--set", f"data.dir={data}"]
    res = cli("pretrain", TINY, *with_data, "--out", run, "--dry-run")
    assert res.code == 0 and "dry run: nothing was written" in res.out and not run.exists()
    res = cli("pretrain", TINY, *with_data, "--set", "train.steps=4", "--out", run)
    assert res.code == 0, res.err
    assert cli("babilong", TINY, *with_data, "--set", "babilong.split=train", "--out", sets).code == 0
    res = cli("finetune", TINY, *with_data, "--set", f"finetune.init_from={run}", "--set", f"finetune.data={sets}",
              "--set", 'finetune.tasks=["qa1", "qa2"]', "--set", "finetune.stages=[2, 32]", "--set", "train.steps=2",
              "--set", "train.eval_every=0", "--out", ft)
    assert res.code == 0, res.err
    assert "[stage 2/2, 32 segments]" in res.out and "longer rows left out" in res.out
    val = [json.loads(line) for line in (ft / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert [(r["stage"], r["step"]) for r in val] == [(1, 0), (1, 2), (2, 2), (2, 4)]
    best = ft / "checkpoints" / (ft / "checkpoints" / "best_stage_2").read_text().strip()
    recorded = json.loads((best / "trainer_state.json").read_text())["val"]["val_em"]
    assert recorded == pytest.approx(greedy_exact_match(best, validation_rows(ft, 1)))
