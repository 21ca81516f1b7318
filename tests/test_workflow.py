"""The jobs behind `lrjax find-lr` and `lrjax sweep` on tiny data: files, TensorBoard events, summaries."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lrjax
from lrjax import plots, workflow

from conftest import strip_times, synthetic


@pytest.fixture(scope="module")
def data():
    return synthetic(n_train=320, valid=96, n_test=32, size=5, classes=3, noise=120)


def cfg(tmp_path, **kw):
    return lrjax.Config(workdir=str(tmp_path), dataset="toy", hidden_sizes=(12,), batch_size=16,
                        progress=False, **kw)


def scalars(logdir, tag):
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    ea.Reload()
    return [e.value for e in ea.Scalars(tag)]


@pytest.mark.slow
def test_find_lr_job_writes_every_output(tmp_path, data, capsys):
    r = workflow.find_lr_job(cfg(tmp_path, start_lr=1e-3, end_lr=50.0, num_steps=120, num_seeds=2), data)
    j = json.loads((tmp_path / "lr_find.json").read_text())
    assert j["suggestion"] == r.suggestion and j["method"] == lrjax.suggest.DEFAULT_METHOD
    assert len(j["per_seed_losses"]) == 2 and j["num_seeds"] == 2
    losses = scalars(tmp_path / "tensorboard" / "lr_find", "loss")
    assert len(losses) == len(j["lrs"]) and losses[0] == pytest.approx(j["losses"][0])
    out = capsys.readouterr().out
    assert "suggested lr" in out and "range test:" in out


@pytest.mark.slow
def test_sweep_job_writes_every_output(tmp_path, data, capsys):
    (tmp_path / "lr_find.json").write_text(json.dumps({"suggestions": {"seed": 0.05, "valley": None}}))
    r = workflow.sweep_job(cfg(tmp_path, lrs=(0.01, 1.0), num_lrs=3, epochs=2, num_seeds=2), data)
    j = json.loads((tmp_path / "sweep.json").read_text())
    assert j["best_lr"] == r.best_lr and j["suggestions"] == {"seed": 0.05, "valley": None}
    assert len(j["members"]) == 6 and (tmp_path / "sweep.png").exists()
    runs = sorted((tmp_path / "tensorboard" / "sweep").iterdir())
    assert len(runs) == 6
    assert len(scalars(runs[0], "val_accuracy")) == 2
    ea = EventAccumulator(str(runs[0]))
    ea.Reload()
    assert "_hparams_/session_start_info" in ea.summary_metadata, "no hparams for TensorBoard's HParams view"
    assert "best lr" in capsys.readouterr().out


def test_sweep_job_rejects_a_missing_lr_find_json(tmp_path, data):
    with pytest.raises(lrjax.LrjaxError, match="does not exist"):
        workflow.sweep_job(cfg(tmp_path, lr_find_json=str(tmp_path / "nope.json"), epochs=1), data)


@pytest.mark.slow
def test_run_job_writes_every_output_and_fails_fast_on_a_bad_one(tmp_path, data, monkeypatch):
    monkeypatch.setattr(workflow, "load", lambda cfg: data)
    c = cfg(tmp_path, start_lr=1e-3, end_lr=50.0, num_steps=100, epochs=2)
    metrics = workflow.run_job(c)
    for png in ("samples.png", "lr_find.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert json.loads((tmp_path / "lr_find.json").read_text())["suggestion"] == metrics["lr"]
    assert len(scalars(tmp_path / "tensorboard" / "lr_find", "loss")) > 10
    assert sum(metrics["phases_s"].values()) == pytest.approx(metrics["wall_time_s"], rel=1e-9)

    def broken(*args):
        raise OSError("no space left on device")

    monkeypatch.setattr(plots, "save_samples", broken)
    with pytest.raises(OSError, match="no space left"):
        workflow.run_job(c.replace(workdir=str(tmp_path / "second")))
    assert sorted(p.name for p in (tmp_path / "second").iterdir()) == []  # before the range test


@pytest.mark.slow
def test_sweep_job_with_every_member_diverged_is_an_error_after_writing(tmp_path, data):
    with pytest.raises(lrjax.LrjaxError, match="every member of the sweep diverged"):
        workflow.sweep_job(cfg(tmp_path, lrs=(1e20, 1e30), num_lrs=2, epochs=1), data)
    assert json.loads((tmp_path / "sweep.json").read_text())["best_lr"] is None


@pytest.mark.slow
def test_run_job_resumes_at_the_checkpointed_rate_whatever_lr_find_json_says(tmp_path, data, monkeypatch):
    monkeypatch.setattr(workflow, "load", lambda cfg: data)
    c = cfg(tmp_path, start_lr=1e-3, end_lr=50.0, num_steps=100, epochs=2)
    first = workflow.run_job(c)
    # a later find-lr in the same workdir (here: one that found nothing) must not change the run's rate
    (tmp_path / "lr_find.json").write_text(json.dumps({"suggestion": None, "method": "valley"}))
    again = workflow.run_job(c.replace(epochs=3))
    assert again["lr"] == first["lr"] and again["lr_method"] == first["lr_method"] is not None
    assert [h["epoch"] for h in again["history"]] == [1, 2, 3]
    assert again["history"][:2] == first["history"]


def test_run_job_stopped_after_an_epoch_resumes_to_the_same_end(tmp_path, data, monkeypatch):
    monkeypatch.setattr(workflow, "load", lambda cfg: data)
    c = cfg(tmp_path / "a", start_lr=1e-3, end_lr=50.0, num_steps=100, epochs=3)
    whole = workflow.run_job(c)
    with pytest.raises(workflow.Interrupted, match="after epoch 1"):
        workflow.run_job(c.replace(workdir=str(tmp_path / "b")), stop_after=1)
    resumed = workflow.run_job(c.replace(workdir=str(tmp_path / "b")))
    assert strip_times(resumed["history"]) == strip_times(whole["history"])
    assert (resumed["lr"], resumed["test_loss"]) == (whole["lr"], whole["test_loss"])


def test_run_job_refuses_another_runs_workdir_before_writing(tmp_path, data, monkeypatch):
    monkeypatch.setattr(workflow, "load", lambda cfg: data)
    workflow.train_job(cfg(tmp_path, lr=0.05, epochs=1), data)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(lrjax.ConfigError, match="batch_size 16 \\(now 8\\)"):
        workflow.run_job(cfg(tmp_path, start_lr=1e-3, end_lr=50.0, num_steps=100, epochs=2).replace(batch_size=8))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no samples.png, no lr_find.*


@pytest.mark.parametrize("text, match", [
    ("hi\n", "lr_find.json is not valid JSON"),
    ('{"suggestions": {"valley": "0.01"}}', "lr_find.json has no 'suggestions'"),
    ('{"suggestions": [0.01, 0.1]}', "lr_find.json has no 'suggestions'"),
])
def test_a_malformed_lr_find_json_is_named_before_the_sweep(tmp_path, data, text, match, monkeypatch):
    (tmp_path / "lr_find.json").write_text(text)
    monkeypatch.setattr(lrjax.sweeps, "sweep", None)  # it must not get that far
    with pytest.raises(lrjax.LrjaxError, match=match):
        workflow.sweep_job(cfg(tmp_path, epochs=1), data)


@pytest.mark.parametrize("kw, match", [
    (dict(batch_size=160), "ran only 2 steps, too few to suggest a rate; raise --num-steps"),
    (dict(start_lr=1e3, end_lr=1e6, num_steps=50),
     r"diverged at step 1 \(lr 1.15e\+03\), too early .* lower --start-lr"),
])
def test_too_few_points_says_why(tmp_path, data, kw, match):
    with pytest.raises(lrjax.LrjaxError, match=match):
        workflow.find_lr_job(cfg(tmp_path).replace(**kw), data)


def test_find_lr_job_reports_its_phases(tmp_path, data, monkeypatch):
    monkeypatch.setattr(workflow, "load", lambda cfg: data)
    workflow.find_lr_job(cfg(tmp_path, start_lr=1e-3, end_lr=50.0, num_steps=60))
    j = json.loads((tmp_path / "lr_find.json").read_text())
    assert set(j["phases_s"]) == {"data_load", "range_test_compile", "range_test", "verification", "outputs", "other"}
    assert j["phases_s"]["verification"] == j["verification"]["seconds"]  # the default's candidate stage
    assert all(v >= 0 for v in j["phases_s"].values())
    assert j["phases_s"]["range_test_compile"] == j["compile_time_s"]
    assert j["phases_s"]["range_test"] == pytest.approx(j["wall_time_s"] - j["compile_time_s"])
    assert j["startup_s"] > 0  # this process's start to lrjax's import (Linux)
    # the timeline: the same phases as [start, end] since the process started, in the order they ran
    spans = j["timeline_s"]
    assert list(spans) == ["startup", "data_load", "set_up", "range_test_compile", "range_test", "verification",
                           "outputs"]
    assert spans["startup"] == [0.0, j["startup_s"]]
    ends = [x for span in spans.values() for x in span]
    assert ends == sorted(ends)
    for name in ("data_load", "range_test_compile", "range_test", "verification", "outputs"):
        assert spans[name][1] - spans[name][0] == pytest.approx(j["phases_s"][name], abs=2e-4)
    # given its data (lrjax run), the job loads none
    workflow.find_lr_job(cfg(tmp_path, start_lr=1e-3, end_lr=50.0, num_steps=60), data)
    assert "data_load" not in json.loads((tmp_path / "lr_find.json").read_text())["phases_s"]


def test_run_job_with_an_lr_free_optimizer_skips_the_range_test(tmp_path, data, monkeypatch, capsys):
    monkeypatch.setattr(workflow, "load", lambda cfg: data)
    metrics = workflow.run_job(cfg(tmp_path, optimizer="prodigy", epochs=1))
    assert metrics["lr"] == 1.0 and metrics["lr_method"] == "lr-free"
    assert not (tmp_path / "lr_find.json").exists()
    assert "prodigy sets its own step size: no range test, training at lr 1" in capsys.readouterr().out
