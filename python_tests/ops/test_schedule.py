"""AdaptiveSGOScheduler follows DESIGN.md's rule exactly."""

import random

import pytest

from distillm_ext.schedule import AdaptiveSGOScheduler


def test_phi_rises_only_when_validation_loss_gets_worse_by_eps():
    scheduler = AdaptiveSGOScheduler(loss_eps=0.1, n_phi=10)
    script = [  # (val loss, phi rose?, phi after, reference after)
        (2.0, False, 0.0, 2.0),    # first validation: only recorded
        (2.05, False, 0.0, 2.0),   # worse, by less than eps
        (1.5, False, 0.0, 2.0),    # better: the reference stays (only a rise moves it)
        (2.15, True, 0.1, 2.15),
        (2.2, False, 0.1, 2.15),
        (2.3, True, 0.2, 2.3),
    ]
    for loss, rose, phi, reference in script:
        assert scheduler.update(loss) is rose
        assert scheduler.phi == pytest.approx(phi) and scheduler.reference_loss == reference
    for step in range(12):
        scheduler.update(2.3 + 0.2 * (step + 1))
    assert scheduler.phi == 1.0  # capped


@pytest.mark.parametrize("reference, phi_after", [("before_training", 0.1), ("first_validation", 0.0)])
def test_the_loss_before_training_is_the_first_reference_by_default(reference, phi_after):
    # The paper's code compares the first validation with the loss before training; the other
    # reading only records the first validation.
    scheduler = AdaptiveSGOScheduler(loss_eps=0.1, n_phi=10, reference=reference)
    assert scheduler.update(1.0, before_training=True) is False and scheduler.phi == 0.0
    assert scheduler.update(2.0) is (phi_after > 0)
    assert scheduler.phi == pytest.approx(phi_after) and scheduler.reference_loss == 2.0


def test_unknown_reference_is_an_error():
    with pytest.raises(ValueError, match="reference must be one of before_training, first_validation"):
        AdaptiveSGOScheduler(reference="whenever")


def replay_decisions(phi, ratio, steps, total, full, seed):
    """The rule written out independently, on the same random stream."""
    draws, decisions = random.Random(seed), []
    for step in steps:
        r = draws.random()
        s = {"decreasing": phi * (1 - step / total), "constant": phi * 0.5, "increasing": phi * step / total}[ratio]
        decisions.append("generate" if r < s or (r < phi and not full) else "replay" if r < phi else "dataset")
    return decisions


@pytest.mark.parametrize("ratio", ["decreasing", "constant", "increasing"])
@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("phi", [0.0, 0.3, 1.0])
def test_choose_follows_the_rule(ratio, full, phi):
    scheduler = AdaptiveSGOScheduler(init_threshold=phi, replay_ratio=ratio, total_steps=100, seed=7)
    steps = list(range(0, 100, 3))
    assert [scheduler.choose(step, full) for step in steps] == replay_decisions(phi, ratio, steps, 100, full, 7)


def test_edge_cases_of_the_rule():
    never = AdaptiveSGOScheduler(init_threshold=0.0, total_steps=10)
    assert {never.choose(step, True) for step in range(10)} == {"dataset"}
    always = AdaptiveSGOScheduler(init_threshold=1.0, total_steps=10)
    assert {always.choose(step, False) for step in range(10)} == {"generate"}  # fill the buffer first
    assert always.choose(0, True) == "generate" and always.choose(10, True) == "replay"


def test_state_dict_round_trip_continues_the_same_draws():
    original = AdaptiveSGOScheduler(init_threshold=0.5, total_steps=50, seed=3)
    original.update(1.0)
    [original.choose(step, True) for step in range(5)]
    restored = AdaptiveSGOScheduler(total_steps=50, seed=99)
    restored.load_state_dict(original.state_dict())
    assert [restored.choose(s, True) for s in range(5, 50)] == [original.choose(s, True) for s in range(5, 50)]
    assert restored.reference_loss == 1.0


@pytest.mark.parametrize("kwargs, message", [
    ({"init_threshold": 1.5}, "init_threshold"), ({"n_phi": 0}, "n_phi"),
    ({"replay_ratio": "sometimes"}, "replay_ratio"), ({"total_steps": 0}, "total_steps"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveSGOScheduler(**kwargs)
