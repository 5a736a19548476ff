"""metrics.jsonl's one owner: write, truncate on resume, read, and the TensorBoard mirror."""

from distillm_ext.recipe.metrics import MetricsLog, read_metrics, scalars


def test_write_read_and_truncate(tmp_path):
    log = MetricsLog(tmp_path)
    records = [{"kind": "train", "step": step, "loss": 1.0 / step} for step in (1, 2, 3)]
    for record in records:
        log.write(record)
    assert read_metrics(tmp_path) == records
    log.truncate_after(2)
    assert read_metrics(tmp_path) == records[:2]
    log.write({"kind": "eval", "step": 3, "val_loss": 0.5})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert read_metrics(tmp_path / "elsewhere") == []


def test_scalars_flatten_numbers_only():
    record = {"kind": "train", "step": 4, "loss": 2.5, "source": "dataset", "ce_loss": None, "ok": True,
              "time": {"teacher_forward": 0.25, "generate": 1}, "sources": {"replay": 3}}
    assert scalars(record) == {"loss": 2.5, "time/teacher_forward": 0.25, "time/generate": 1.0,
                               "sources/replay": 3.0}


def test_tensorboard_mirror(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path, tensorboard=True)
    log.write({"kind": "train", "step": 1, "loss": 3.0, "time": {"backward": 0.5}})
    log.write({"kind": "train", "step": 2, "loss": 2.0, "time": {"backward": 0.4}})
    log.write({"kind": "eval", "step": 2, "val_loss": 1.5})
    log.close()
    board = EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    assert [(e.step, e.value) for e in board.Scalars("train/loss")] == [(1, 3.0), (2, 2.0)]
    assert [(e.step, e.value) for e in board.Scalars("eval/val_loss")] == [(2, 1.5)]
    assert len(board.Scalars("train/time/backward")) == 2
    assert len(read_metrics(tmp_path)) == 3  # the JSONL stays the record
