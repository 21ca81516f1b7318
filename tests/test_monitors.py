"""EarlyStopping on scripted metric sequences (Keras `EarlyStopping` semantics)."""

from __future__ import annotations

import math

import pytest

from lrjax.monitors import EarlyStopping


def feed(es: EarlyStopping, values, monitor: str | None = None, start: int = 1):
    """Feeds one value per epoch until the monitor says stop; returns [(epoch, improved)]."""
    out = []
    for epoch, v in enumerate(values, start=start):
        if es.should_stop:
            break
        out.append((epoch, es.update(epoch, {monitor or es.monitor: v})))
    return out


def test_patience_stops_after_exactly_patience_non_improving_epochs():
    es = EarlyStopping(patience=3)
    steps = feed(es, [1.0, 0.8, 0.9, 0.85, 0.81, 0.5, 0.4])
    # best 0.8 at epoch 2, then 3 epochs without improvement: stop decided at epoch 5 (wait 3 >= 3)
    assert steps == [(1, True), (2, True), (3, False), (4, False), (5, False)]
    assert es.should_stop and es.stopped_epoch == 5
    assert es.best == 0.8 and es.best_epoch == 2 and es.wait == 3


def test_patience_counter_resets_on_improvement():
    es = EarlyStopping(patience=2)
    feed(es, [1.0, 1.1, 0.9, 1.0, 0.8, 0.85, 0.86, 0.1])
    # 1.1 (wait 1), 0.9 best, 1.0 (wait 1), 0.8 best, 0.85 (1), 0.86 (2) -> stop at epoch 7
    assert es.stopped_epoch == 7 and es.best_epoch == 5 and es.best == 0.8


def test_patience_zero_stops_at_first_non_improving_epoch():
    es = EarlyStopping(patience=0)
    assert feed(es, [1.0, 0.9, 0.95, 0.1]) == [(1, True), (2, True), (3, False)]
    assert es.stopped_epoch == 3


def test_never_stops_while_improving():
    es = EarlyStopping(patience=1)
    feed(es, [1.0 / (e + 1) for e in range(50)])
    assert not es.should_stop and es.best_epoch == 50 and es.wait == 0


def test_min_delta_small_improvements_do_not_count():
    es = EarlyStopping(patience=2, min_delta=0.1)
    steps = feed(es, [1.0, 0.95, 0.91, 0.5])
    assert steps == [(1, True), (2, False), (3, False)]  # 0.05 and 0.09 below the 0.1 threshold
    assert es.should_stop and es.best == 1.0 and es.best_epoch == 1
    es = EarlyStopping(patience=2, min_delta=0.1)
    assert feed(es, [1.0, 0.85, 0.8, 0.7]) == [(1, True), (2, True), (3, False), (4, True)]
    assert es.best == 0.7 and es.best_epoch == 4 and not es.should_stop


def test_mode_max_on_accuracy():
    es = EarlyStopping(monitor="accuracy", mode="max", patience=2)
    steps = feed(es, [0.5, 0.7, 0.6, 0.65, 0.99])
    assert steps == [(1, True), (2, True), (3, False), (4, False)]
    assert es.best == 0.7 and es.best_epoch == 2 and es.stopped_epoch == 4


def test_mode_max_with_min_delta():
    es = EarlyStopping(monitor="val_accuracy", mode="max", patience=5, min_delta=0.02)
    feed(es, [0.5, 0.51, 0.53, 0.54])
    assert es.best == 0.53 and es.best_epoch == 3 and es.wait == 1


def test_mode_auto():
    assert EarlyStopping(monitor="val_accuracy").mode == "max"
    assert EarlyStopping(monitor="accuracy").mode == "max"
    assert EarlyStopping(monitor="val_loss").mode == "min"
    es = EarlyStopping(monitor="val_accuracy", patience=1)  # auto -> max: a rise is an improvement
    assert feed(es, [0.5, 0.6, 0.55]) == [(1, True), (2, True), (3, False)]
    assert es.best == 0.6 and es.stopped_epoch == 3


def test_invalid_settings():
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping(mode="up")
    with pytest.raises(ValueError):
        EarlyStopping(patience=-1)
    with pytest.raises(ValueError):
        EarlyStopping(min_delta=-0.1)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_never_counts_as_improvement(bad):
    es = EarlyStopping(patience=2)
    assert es.update(1, {"val_loss": bad}) is False  # not even as the first value
    assert es.best is None and es.best_epoch is None and es.wait == 1
    assert es.update(2, {"val_loss": 1.0}) is True
    assert es.update(3, {"val_loss": bad}) is False
    assert es.update(4, {"val_loss": bad}) is False
    assert es.best == 1.0 and es.best_epoch == 2 and es.should_stop and es.stopped_epoch == 4
    es = EarlyStopping(monitor="val_accuracy", patience=3)
    es.update(1, {"val_accuracy": 0.5})
    assert es.update(2, {"val_accuracy": bad}) is False and es.best == 0.5


def test_missing_monitor_key_raises_keyerror():
    es = EarlyStopping(monitor="val_loss")
    with pytest.raises(KeyError, match="val_loss"):
        es.update(1, {"loss": 0.3, "accuracy": 0.9})
    assert es.best is None and es.wait == 0  # nothing recorded


def test_best_epoch_tracked_with_ties():
    es = EarlyStopping(patience=10)
    feed(es, [3.0, 2.0, 2.0, 2.5, 1.5, 1.5])
    assert es.best == 1.5 and es.best_epoch == 5 and es.wait == 1  # an equal value is no improvement


@pytest.mark.parametrize("split", [1, 3, 5, 6])
def test_state_dict_round_trip_continues_identically(split):
    values = [1.0, 0.8, 0.85, 0.9, 0.7, 0.75, 0.76, 0.77, 0.6]
    kwargs = dict(patience=3, min_delta=0.01)
    ref = EarlyStopping(**kwargs)
    ref_steps = feed(ref, values)

    first = EarlyStopping(**kwargs)
    steps = feed(first, values[:split])
    state = first.state_dict()
    import json

    state = json.loads(json.dumps(state))  # travels as JSON in the checkpoint's meta
    second = EarlyStopping(**kwargs)
    second.load_state_dict(state)
    assert second.state_dict() == first.state_dict()
    steps += feed(second, values[split:], start=split + 1)
    assert steps == ref_steps
    assert second.state_dict() == ref.state_dict()
    assert ref.stopped_epoch == 8 and ref.best_epoch == 5
