"""Metric files: JSONL + CSV rows, trimmed on resume; the debiased loss EMA."""

from __future__ import annotations

import csv
import json

import pytest

from lm2cli.training.metrics import LossEMA, MetricsLog, fmt_duration, truncate_after


def write_rows(tmp_path, rows):
    log = MetricsLog(tmp_path, tensorboard=False)
    for r in rows:
        log.write(r)
    log.close()


def read(tmp_path):
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    with open(tmp_path / "metrics.csv", newline="") as f:
        return jsonl, list(csv.DictReader(f))


def test_rows_go_to_jsonl_and_csv(tmp_path):
    write_rows(tmp_path, [{"kind": "train", "step": 1, "stage": 1, "loss": 2.5, "lr": 1e-3},
                          {"kind": "val", "step": 1, "stage": 1, "val_loss": float("nan")}])
    jsonl, rows = read(tmp_path)
    assert jsonl[0]["loss"] == 2.5 and jsonl[1]["val_loss"] is None  # NaN is not JSON
    assert rows[0]["kind"] == "train" and rows[0]["loss"] == "2.5" and rows[1]["val_loss"] == ""


def test_truncate_after_orders_by_stage_then_step(tmp_path):
    rows = [{"kind": "train", "step": s, "stage": 1, "loss": 1.0} for s in (1, 2, 3, 4)]
    rows += [{"kind": "val", "step": 4, "stage": 1}, {"kind": "val", "step": 4, "stage": 2},
             {"kind": "train", "step": 5, "stage": 2, "loss": 1.0}]
    write_rows(tmp_path, rows)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # a line cut by a kill
    truncate_after(tmp_path, 4, stage=1)
    jsonl, csv_rows = read(tmp_path)
    assert [(r["stage"], r["step"]) for r in jsonl] == [(1, 1), (1, 2), (1, 3), (1, 4), (1, 4)]
    assert len(csv_rows) == 5
    truncate_after(tmp_path, -1)
    assert read(tmp_path) == ([], [])
    write_rows(tmp_path, [{"kind": "train", "step": 1}])  # appending after a trim keeps one header
    assert len(read(tmp_path)[1]) == 1


def test_loss_ema_is_debiased():
    ema = LossEMA(0.9)
    assert ema.update(4.0) == pytest.approx(4.0)
    assert ema.update(4.0) == pytest.approx(4.0)
    assert 2.0 < ema.update(2.0) < 4.0


def test_fmt_duration():
    assert fmt_duration(65) == "1m05s" and fmt_duration(3700) == "1h01m"
