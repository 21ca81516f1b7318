"""lrjax.tb: a curve written in one go reads back in TensorBoard as the per-step writer's does."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lrjax import tb


def read(logdir):
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea, {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_write_curve_matches_the_per_step_writer(tmp_path):
    lrs, losses = np.geomspace(1e-3, 1, 40), np.linspace(2.3, 0.4, 40)
    tb.write_curve(tmp_path / "curve", {"loss": losses, "learning_rate": lrs}, texts={"suggestions": '{"a": 1}'})
    writer = tb.Writer(tmp_path / "steps", purge_step=0)
    for i, (lr, loss) in enumerate(zip(lrs, losses)):
        writer.write_scalars(i, {"loss": loss, "learning_rate": lr})
    writer.write_text("suggestions", '{"a": 1}')
    writer.close()
    (ea, curve), (ea_steps, steps) = read(tmp_path / "curve"), read(tmp_path / "steps")
    assert curve == steps and len(curve["loss"]) == 40
    assert curve["loss"][5] == (5, pytest.approx(losses[5]))
    [text] = ea.Tensors("suggestions/text_summary")
    assert json.loads(text.tensor_proto.string_val[0]) == {"a": 1}


def test_write_curve_replaces_an_earlier_curve(tmp_path):
    # a second range test in the same workdir: TensorBoard shows its curve only, as purge_step=0 did
    tb.write_curve(tmp_path, {"loss": np.full(30, 5.0)})
    tb.write_curve(tmp_path, {"loss": np.arange(10.0)})
    assert read(tmp_path)[1]["loss"] == [(i, float(i)) for i in range(10)]
    assert len(list(tmp_path.glob("events.out.tfevents*"))) == 2


def test_write_curve_disabled_writes_nothing(tmp_path):
    tb.write_curve(tmp_path / "x", {"loss": [1.0]}, enabled=False)
    assert not (tmp_path / "x").exists()
