"""The verification stage of the default suggestion (lrjax.verify) and how find_lr uses it."""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx
import pytest

import lrjax
from lrjax import suggest, verify

from conftest import synthetic


def test_candidates_hang_below_the_anchor_two_x_apart():
    np.testing.assert_allclose(verify.candidate_rates(0.04), [0.04, 0.02, 0.01, 0.005, 0.0025, 0.00125])
    np.testing.assert_allclose(verify.candidate_rates(1.0, num=3, spacing=4.0), [1.0, 0.25, 0.0625])
    with pytest.raises(ValueError, match="anchor must be positive"):
        verify.candidate_rates(0.0)


def test_pick_is_the_lowest_finite_loss_and_none_when_all_diverged():
    assert verify.pick([0.4, 0.2, 0.1], [0.9, 0.5, 0.7]) == 0.2
    assert verify.pick([0.4, 0.2, 0.1], [None, float("nan"), 0.7]) == 0.1
    assert verify.pick([0.4, 0.2], [0.5, 0.5]) == 0.2  # a tie: the lower rate
    assert verify.pick([0.4, 0.2, 0.1], [1.0, 1.009, 1.05]) == 0.2  # within 1% of the lowest: tied
    assert verify.pick([0.4, 0.2, 0.1], [1.0, 1.009, 1.05], tolerance=0.0) == 0.4
    assert verify.pick([0.4, 0.2], [-2.0, -1.99]) == 0.2  # negative losses (log-likelihoods): of the magnitude
    assert verify.pick([0.4, 0.2], [None, None]) is None


def test_default_steps_is_an_eighth_of_an_epoch_with_a_floor():
    assert verify.default_steps(1719) == 214
    assert verify.default_steps(188) == 40
    assert verify.default_steps(25) == 25  # never more than the epoch


@pytest.fixture(scope="module")
def data():
    return synthetic(n_train=512, valid=128, n_test=64, size=6, classes=4, noise=150)


def test_a_flat_stage_ties_every_candidate():
    rates = verify.candidate_rates(0.071).tolist()
    flat = [3.355, 3.388, 3.387, 3.337, 3.346, 3.373]  # within 2% of the lowest: nothing ranks them
    assert verify.pick(rates, flat) == rates[-1]
    assert verify.pick(rates, flat[:-1] + [3.41]) == rates[4]  # 2.2% apart: the 1% tie rule (3.346 ties)
    assert verify.pick(rates, flat[:-1] + [None]) == rates[-2]  # the lowest finite one

    def train(r):  # flat down to 1.1e-3, better at 5.5e-4, far worse below
        return [3.317 if 5e-4 < x < 6e-4 else 3.70 if x < 5e-4 else dict(zip(rates, flat)).get(x, 3.336) for x in r]

    v = verify.verify(0.071, train, steps=40, batch_size=32, valid_examples=335)
    assert v.candidate == pytest.approx(0.071 / 128) and len(v.candidates) == verify.NUM_CANDIDATES + 3
    assert v.candidate < v.picked < v.candidate * 2 ** 0.5  # between it and its better neighbour above


def test_a_candidate_cools_down_to_zero_over_the_last_quarter_of_its_steps():
    lrs = verify.candidate_schedule(0.1, steps=8, length=12)
    np.testing.assert_allclose(lrs[:6], 0.1)
    np.testing.assert_allclose(lrs[6:8], [0.05, 0.0], atol=1e-8)  # 2 of 8 steps: halfway, then zero
    np.testing.assert_allclose(lrs[8:], 0.1)  # the padding is never run
    np.testing.assert_allclose(verify.candidate_schedule(0.1, 40, 40)[30:], 0.1 * np.arange(10, -1, -1)[1:] / 10,
                               atol=1e-8)
    assert verify.candidate_schedule(0.1, 3, 3)[-1] == 0.0  # at least one step
    np.testing.assert_allclose(verify.candidate_schedule(0.1, 5, 5, cooldown=0.0), 0.1)
    with pytest.raises(ValueError):
        verify.candidate_schedule(0.1, steps=6, length=5)


def test_verify_scores_the_candidates_with_what_train_returns():
    seen = []

    def train(rates):
        seen.append(list(rates))
        return [0.9, 0.5, None, float("nan"), 0.7, 0.8]

    v = verify.verify(0.04, train, steps=12, batch_size=16, valid_examples=100)
    assert seen == [v.candidates] and v.candidates == verify.candidate_rates(0.04).tolist()
    assert v.val_losses == [0.9, 0.5, None, None, 0.7, 0.8] and v.picked == 0.02
    assert (v.steps, v.train_examples, v.valid_examples, v.anchor) == (12, 192, 100, 0.04)


def test_verify_goes_below_the_candidates_while_the_lowest_wins():
    """A loss valley at rate 3e-4 (quadratic in log rate): the six candidates from 0.04 end at 1.25e-3,
    the lowest of them wins, so the stage halves on until a lower rate scores worse than the pick."""
    calls = []

    def train(rates):
        calls.append(len(rates))
        return [1.0 + 0.05 * np.log10(r / 3e-4) ** 2 for r in rates]

    v = verify.verify(0.04, train, steps=12, batch_size=16, valid_examples=100)
    assert calls[0] == verify.NUM_CANDIDATES and all(c == 1 for c in calls[1:])
    assert v.candidates[:verify.NUM_CANDIDATES] == verify.candidate_rates(0.04).tolist()
    assert np.allclose(np.diff(np.log2(v.candidates)), -1.0)
    assert v.candidate == verify.pick(v.candidates, v.val_losses)
    assert 1e-4 <= v.candidate <= 6e-4 and v.candidate > min(v.candidates)  # bracketed: a lower rate did worse
    # a gentle valley: the rates below it tie within 1%, the pick is the lowest tied, and the parabola
    # through it and its neighbours moves it towards the valley by at most half a spacing
    assert v.candidate < v.picked <= min(3e-4, v.candidate * 2 ** 0.5) * (1 + 1e-9)

    def flat(rates):
        return [1.0] * len(rates)  # every rate ties: the stage stops after MAX_EXTRA more

    v = verify.verify(0.04, flat, steps=12, batch_size=16, valid_examples=100)
    assert len(v.candidates) == verify.NUM_CANDIDATES + verify.MAX_EXTRA and v.picked == min(v.candidates)
    assert v.picked == v.candidate  # a plateau does not curve: the candidate stands


def test_refine_moves_the_pick_to_the_parabolas_vertex_by_half_a_spacing_at_most():
    rates = [0.08, 0.04, 0.02, 0.01]
    # losses quadratic in log2(rate) with the minimum at 0.03: the vertex is found exactly
    valley = [(np.log2(r / 0.03)) ** 2 for r in rates]
    assert verify.refine(rates, valley, 0.04) == pytest.approx(0.03)
    assert verify.refine(rates, valley, 0.02) == pytest.approx(0.02 * 2 ** 0.5)  # 0.58 spacings away: half of one
    assert verify.refine(rates, [1.0, 0.5, 0.5, 1.0], 0.02) == pytest.approx(0.02 * 2 ** 0.5)
    assert verify.refine(rates, [1.0, 0.6, 0.5, 0.6], 0.02) == 0.02  # symmetric neighbours: no move
    assert verify.refine(rates, [1.0, 0.5, 0.6, 0.7], 0.04) == pytest.approx(0.04 * 2 ** ((0.6 - 1.0) / 1.2))
    for losses, at in (([0.9, 0.7, 0.5, 0.3], 0.02),  # no upward curvature
                       ([None, 0.5, 0.4, 0.6], 0.04),  # a neighbour diverged
                       ([0.9, 0.5, 0.4, 0.6], 0.01),  # the lowest rate: one neighbour only
                       ([0.9, 0.5, float("nan"), 0.6], 0.04)):
        assert verify.refine(rates, losses, at) == at
    assert verify.refine(rates, valley, None) is None


def test_find_lr_candidates_are_the_tests_first_batches_at_a_constant_rate(data, monkeypatch):
    """Without the cooldown, a candidate's validation loss is what the range test itself measures when its
    rate stays at that candidate: the same compiled steps over the same first batches, evaluated on the
    same examples. With it (the default) the scores differ."""
    cooled = lrjax.find_lr(lrjax.mlp(36, (16,), 4, seed=0), optax.adam, data, batch_size=16, num_steps=150, seed=0,
                           start_lr=1e-4, end_lr=10.0, verify_steps=12, eval_examples=100).verification
    monkeypatch.setattr(verify, "COOLDOWN", 0.0)
    model = lrjax.mlp(36, (16,), 4, seed=0)
    before = [np.asarray(a).copy() for a in jax.tree.leaves(nnx.state(model))]
    r = lrjax.find_lr(model, optax.adam, data, batch_size=16, num_steps=150, seed=0, start_lr=1e-4, end_lr=10.0,
                      verify_steps=12, eval_examples=100)
    v = r.verification
    assert v.steps == 12 and v.train_examples == 192 and v.valid_examples == 100
    assert len(v.val_losses) == 6 and all(x is not None and np.isfinite(x) for x in v.val_losses)
    assert v.candidate == verify.pick(v.candidates, v.val_losses)
    assert r.suggestion == v.picked == verify.refine(v.candidates, v.val_losses, v.candidate)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), before, strict=True):  # the model is left alone
        np.testing.assert_array_equal(np.asarray(a), b)
    for rate, loss in zip(v.candidates[::5], v.val_losses[::5]):
        flat = lrjax.find_lr(model, optax.adam, data, batch_size=16, num_steps=12, seed=0, start_lr=rate,
                             factor=1 + 1e-7, eval_every=11, eval_examples=100, method="lagsafe",
                             stop_on_divergence=False)  # a rate that (all but) stays
        np.testing.assert_allclose(flat.val_losses[-1], loss, rtol=1e-5)
    assert cooled.candidates[:6] == v.candidates[:6]  # the same test, the same anchor
    assert not np.allclose(cooled.val_losses[:6], v.val_losses[:6], rtol=1e-3)


def test_find_lr_default_verifies_and_a_rule_does_not(data):
    kw = dict(batch_size=16, num_steps=150, seed=0, start_lr=1e-4, end_lr=10.0)
    r = lrjax.find_lr(lrjax.mlp(36, (16,), 4, seed=0), optax.adam, data, **kw)
    assert r.method == "verified" and r.verification is not None and r.suggestion == r.verification.picked
    assert r.verification.anchor == r.suggestions["turn"] and r.suggestions["verified"] == r.suggestion
    assert r.to_json()["verification"]["candidates"] == r.verification.candidates
    plain = lrjax.find_lr(lrjax.mlp(36, (16,), 4, seed=0), optax.adam, data, method="lagsafe", **kw)
    assert plain.verification is None and "verified" not in plain.suggestions
    np.testing.assert_array_equal(plain.losses, r.losses)  # the same test


def test_find_lr_fed_batch_by_batch_falls_back_and_says_so(data):
    batches = [(data.x_train[i:i + 16], data.y_train[i:i + 16]) for i in range(0, 512 - 128, 16)]
    r = lrjax.find_lr(lrjax.mlp(36, (16,), 4, seed=0), optax.adam, batches, num_steps=100, seed=0,
                      start_lr=1e-4, end_lr=10.0)
    assert r.verification is None and r.suggestion == r.suggestions[suggest.FALLBACK_METHOD]
    assert any("(iterable input)" in n for n in r.notes), r.notes
