"""AdaptWeighter: weights equal a direct cosine computation; anchors refresh from the model."""

from __future__ import annotations

import math

import pytest
import torch

from datasteer.errors import ConfigError, SteeringStateError
from datasteer.weighters.adapt import AdaptParams, AdaptWeighter
from tests.factories import weight_context
from tests.fakes import FakeOps

ANCHORS = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # normalised: e1, e2
BATCH = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
LOSSES = torch.ones(3)  # unread: the weights depend on the embeddings only


def refreshed(**params: object) -> AdaptWeighter:
    weighter = AdaptWeighter(AdaptParams(**params))  # type: ignore[arg-type]
    ops = FakeOps(targets=[FakeOps(embeddings=ANCHORS)])
    assert weighter.refresh(ops) == {"anchors": 2, "nonfinite": 0}
    (call,) = ops.targets[0].calls_to("embeddings")
    assert call.options == {"layer": -1, "pooling": "weighted", "normalize": True}
    return weighter


def test_weights_are_a_sigmoid_of_the_mean_cosine_to_the_anchors() -> None:
    # cosines to (e1, e2): [1, 0], [0.7071, 0.7071], [0, -1] -> means 0.5, 0.7071, -0.5
    means = [0.5, 1 / math.sqrt(2), -0.5]
    raw = [1 / (1 + math.exp(-m / 0.5)) for m in means]
    weighter = refreshed(tau=0.5)
    torch.testing.assert_close(weighter.weigh(weight_context(LOSSES, embeddings=BATCH)), torch.tensor(raw))
    normalised = refreshed(tau=0.5, normalize=True).weigh(weight_context(LOSSES, embeddings=BATCH))
    torch.testing.assert_close(normalised, torch.tensor([3 * r / sum(raw) for r in raw]))


def test_center_subtracts_the_batch_mean_score() -> None:
    means = [0.5, 1 / math.sqrt(2), -0.5]
    avg = sum(means) / 3
    expected = [1 / (1 + math.exp(-(m - avg) / 0.5)) for m in means]
    torch.testing.assert_close(
        refreshed(tau=0.5, center=True).weigh(weight_context(LOSSES, embeddings=BATCH)), torch.tensor(expected)
    )


def test_clip_bounds_the_raw_weights() -> None:
    w = refreshed(tau=0.5, clip=0.6).weigh(weight_context(LOSSES, embeddings=BATCH))
    assert float(w.max()) == pytest.approx(0.6) and float(w[2]) < 0.6


def test_needs_anchors_and_embeddings() -> None:
    with pytest.raises(SteeringStateError, match="anchors were not embedded"):
        AdaptWeighter(AdaptParams()).weigh(weight_context(LOSSES, embeddings=BATCH))
    with pytest.raises(SteeringStateError, match="embeddings are missing"):
        refreshed().weigh(weight_context(LOSSES))
    with pytest.raises(SteeringStateError, match="needs target samples"):
        AdaptWeighter(AdaptParams()).refresh(FakeOps())


def test_state_round_trip_keeps_the_anchors() -> None:
    weighter = refreshed()
    fresh = AdaptWeighter(AdaptParams())
    fresh.load_state_dict(weighter.state_dict())
    torch.testing.assert_close(
        fresh.weigh(weight_context(LOSSES, embeddings=BATCH)), weighter.weigh(weight_context(LOSSES, embeddings=BATCH))
    )


@pytest.mark.parametrize("bad", [{"tau": 0.0}, {"refresh_every": 0}, {"clip": -1.0}])
def test_bad_params(bad: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        AdaptParams(**bad)  # type: ignore[arg-type]


def test_anchor_embeddings_that_are_not_finite_are_left_out() -> None:
    weighter = AdaptWeighter(AdaptParams(tau=0.5))
    nan = float("nan")
    ops = FakeOps(targets=[FakeOps(embeddings=torch.cat([ANCHORS, torch.tensor([[nan, 1.0], [float("inf"), 0.0]])]))])
    assert weighter.refresh(ops) == {"anchors": 2, "nonfinite": 2}
    torch.testing.assert_close(
        weighter.weigh(weight_context(LOSSES, embeddings=BATCH)),
        refreshed(tau=0.5).weigh(weight_context(LOSSES, embeddings=BATCH)),
    )
    # a refresh without one finite anchor keeps the anchors in force
    broken = FakeOps(targets=[FakeOps(embeddings=torch.full((2, 2), nan))])
    assert weighter.refresh(broken) == {"anchors": 2, "nonfinite": 2}
    assert torch.isfinite(weighter.weigh(weight_context(LOSSES, embeddings=BATCH))).all()


def test_without_any_finite_anchor_every_weight_is_one() -> None:
    weighter = AdaptWeighter(AdaptParams())
    weighter.refresh(FakeOps(targets=[FakeOps(embeddings=torch.full((2, 2), float("nan")))]))
    assert weighter.weigh(weight_context(LOSSES, embeddings=BATCH)).tolist() == [1.0, 1.0, 1.0]
