"""ADO's scaling-law fits, learning speeds and data policy against values computed by hand."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import datasteer.mixers.ado as ado_module
from datasteer.config import parse_dataclass
from datasteer.errors import ConfigError
from datasteer.mixers.ado import ADOMixer, ADOParams, clip_min_probability
from datasteer.mixers.base import DomainStats
from datasteer.ops.power_law import START_GRID, fit_power_law, objective, savgol_smooth
from tests.factories import mix_context

NAMES = ("a", "b")


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def stats(step: int, samples: list[float], losses: list[float]) -> DomainStats:
    """One step: ``samples`` of each domain with mean loss ``losses`` (any value where absent)."""
    n, loss = _t(samples), _t(losses)
    return DomainStats(step, n / n.sum(), n, n * loss, n * 10, n * loss * 10)


def ctx(step: int, update: int = 0, sizes: tuple[int, ...] = (5, 5)):
    """The update decided after ``step`` for step ``step + 1`` (lag 0 for simple arithmetic)."""
    return mix_context(names=NAMES, sizes=sizes, step=step, first_step=step + 1, last_step=step + 1, update=update)


# -- the pieces ----------------------------------------------------------------------------------


def test_learning_speed_is_the_derivative_of_the_fitted_law() -> None:
    mixer = ADOMixer(ADOParams())
    mixer.law = _t([[math.log(10.0), math.log(2.0), 0.5], [1.0, math.log(3.0), 0.02]]).view(2, 3)
    got = mixer.learning_speed(_t([100.0, 100.0]))
    # -dL/dn = alpha beta n^-alpha / n: 0.5 * 10 * 100^-0.5 / 100; the exponent 0.02 is floored at 0.05
    # in the factor (not in L - eps, as in the authors' code): 0.05 * e * 100^-0.02 / 100
    assert got.tolist() == pytest.approx([0.5 * 10 * 0.1 / 100, 0.05 * math.e * 100**-0.02 / 100])
    assert mixer.learning_speed(_t([0.0, 100.0]))[0] == 0.0  # a domain never trained


def test_clip_min_probability_raises_small_entries_and_renormalises() -> None:
    got = clip_min_probability(_t([0.995, 0.004, 0.001]), 0.01)
    assert got.tolist() == pytest.approx([0.995 / 1.015, 0.01 / 1.015, 0.01 / 1.015])


def test_savgol_is_the_5_point_cubic_filter_and_keeps_cubics() -> None:
    spike = _t([1.0, 0, 0, 0, 0, 0, 0])
    # interior coefficients of the 5-point cubic (= quadratic) filter: (-3, 12, 17, 12, -3) / 35
    assert savgol_smooth(spike, 5)[2].item() == pytest.approx(-3 / 35)
    assert savgol_smooth(_t([0.0, 0, 1, 0, 0, 0, 0]), 5)[2].item() == pytest.approx(17 / 35)
    t = torch.arange(9, dtype=torch.float64)
    cubic = t**3 - 2 * t + 1  # a cubic is its own least-squares cubic: unchanged, edges included
    torch.testing.assert_close(savgol_smooth(cubic, 5), cubic)
    assert savgol_smooth(_t([1.0, 5.0, 2.0]), 101).tolist() == [1.0, 5.0, 2.0]  # window cut to 3 <= order


def test_savgol_matches_scipy() -> None:
    signal = pytest.importorskip("scipy.signal")
    values = torch.randn(60, generator=torch.Generator().manual_seed(0), dtype=torch.float64).cumsum(0)
    for window in (5, 11, 59):
        expected = signal.savgol_filter(values.numpy(), window, 3, mode="interp")
        torch.testing.assert_close(savgol_smooth(values, window), torch.from_numpy(expected))
    expected = signal.savgol_filter(values.numpy(), 59, 3, mode="interp")  # 101 cut to 60, made odd
    torch.testing.assert_close(savgol_smooth(values, 101), torch.from_numpy(expected))


def test_fit_recovers_a_power_law() -> None:
    n = 8.0 * torch.arange(1, 61, dtype=torch.float64)
    law = fit_power_law(n, 2.0 + 10.0 * n**-0.5)
    assert law.tolist() == pytest.approx([math.log(10.0), math.log(2.0), 0.5], abs=1e-3)


def test_fit_finds_the_minimum_scipys_lbfgs_finds_from_the_same_starts() -> None:
    """The authors fit with L-BFGS from the same 512 starts (jaxopt; Mixtera's port: scipy)."""
    optimize = pytest.importorskip("scipy.optimize")
    gen = torch.Generator().manual_seed(1)
    n = 8.0 * torch.arange(1, 41, dtype=torch.float64)
    loss = 1.8 + 6.0 * n**-0.3 + 0.05 * torch.randn(40, generator=gen, dtype=torch.float64)
    log_n, log_loss, weight = torch.log(n)[None], torch.log(loss)[None], torch.ones(1, 40, dtype=torch.float64)

    def fun(x: Any) -> tuple[float, Any]:
        f, g = objective(torch.from_numpy(x)[None], log_n, log_loss, weight)
        return float(f[0]), g[0].numpy()

    options = {"maxiter": 200, "gtol": 1e-5}
    best = min(
        (optimize.minimize(fun, s.numpy(), jac=True, method="L-BFGS-B", options=options) for s in START_GRID[::8]),
        key=lambda r: r.fun,
    )
    ours = fit_power_law(n, loss)
    assert fun(ours.numpy())[0] <= best.fun + 1e-9


# -- observations --------------------------------------------------------------------------------


def test_observe_imputes_an_absent_domains_loss_and_keeps_credit() -> None:
    mixer = ADOMixer(ADOParams(prior="uniform"))
    mixer.initial(ctx(0))
    mixer.observe(stats(1, [6, 0], [3.0, 0.0]))  # b absent, nothing before: the step's mean loss 3
    mixer.observe(stats(2, [0, 4], [0.0, 5.0]))  # a absent: its previous value
    assert mixer.losses == [[3.0, 3.0], [3.0, 5.0]]
    # h_0 = mu, h <- 0.1 share + 0.9 h: [0.1 + 0.45, 0.45], then [0.495, 0.1 + 0.405]
    assert mixer.credit.tolist() == pytest.approx([0.495, 0.505])


def test_counts_are_all_samples_or_each_domains_own() -> None:
    for counts, expected in (("total", [[8, 8], [16, 16]]), ("domain", [[6, 2], [9, 7]])):
        mixer = ADOMixer(ADOParams(counts=counts))  # type: ignore[arg-type]
        mixer.observe(stats(1, [6, 2], [3.0, 4.0]))
        mixer.observe(stats(2, [3, 5], [2.9, 3.9]))
        assert mixer.cumulative_counts().tolist() == expected


def test_the_prior_is_the_pools_shares_uniform_or_given() -> None:
    sizes = (6, 2)
    assert ADOMixer(ADOParams()).initial(ctx(0, sizes=sizes)).tolist() == [0.75, 0.25]
    assert ADOMixer(ADOParams(prior="uniform")).initial(ctx(0, sizes=sizes)).tolist() == [0.5, 0.5]
    assert ADOMixer(ADOParams(prior=[0.1, 0.9])).initial(ctx(0, sizes=sizes)).tolist() == [0.1, 0.9]


# -- the policy ------------------------------------------------------------------------------------


def test_policy_over_two_updates() -> None:
    mixer = ADOMixer(ADOParams(prior="uniform", fit_every=1000))
    mixer.initial(ctx(0))
    mixer.observe(stats(1, [6, 2], [3.0, 4.0]))  # h = 0.1 [.75, .25] + 0.9 [.5, .5] = [.525, .475]
    mixer.observe(stats(2, [4, 4], [2.9, 3.9]))  # h = 0.1 [.5, .5] + 0.9 h = [.5225, .4775]
    # the laws, as a fit at step 2 left them: L_a = eps + 8 n^-0.5, L_b = eps + 2 n^-0.25
    mixer.law, mixer.fitted_at = _t([math.log(8.0), 1.0, 0.5, math.log(2.0), 1.0, 0.25]).view(2, 3), 2
    first = mixer.update(ctx(2))
    # n = 16: speeds 0.5 * 8 * 16^-0.5 / 16 = 0.0625 and 0.25 * 2 * 16^-0.25 / 16 = 0.015625
    raw = [0.5 * math.sqrt(0.5225) * 0.0625, 0.5 * math.sqrt(0.4775) * 0.015625]  # mu h^0.5 speed
    rho = [v / sum(raw) for v in raw]
    assert rho == pytest.approx([0.807108, 0.192892], abs=1e-6)
    assert mixer.preference.tolist() == pytest.approx(rho)
    assert first.tolist() == pytest.approx([0.1 * r + 0.9 * 0.5 for r in rho])  # average still mu
    # the average: 2 steps served at mu, this update's step at rho
    average = [(2 * 0.5 + r) / 3 for r in rho]
    assert mixer.average.tolist() == pytest.approx(average)
    mixer.observe(stats(3, [5, 3], [2.8, 3.85]))  # h = 0.1 [.625, .375] + 0.9 h = [.53275, .46725]
    second = mixer.update(ctx(3, update=1))
    raw = [0.5 * math.sqrt(0.53275) * 0.5 * 8 * 24**-0.5 / 24, 0.5 * math.sqrt(0.46725) * 0.25 * 2 * 24**-0.25 / 24]
    rho = [v / sum(raw) for v in raw]
    assert second.tolist() == pytest.approx([0.1 * r + 0.9 * m for r, m in zip(rho, average, strict=True)])
    assert mixer.average.tolist() == pytest.approx([(3 * m + r) / 4 for r, m in zip(rho, average, strict=True)])


def test_preferences_below_min_probability_are_raised() -> None:
    mixer = ADOMixer(ADOParams(prior="uniform", fit_every=1000, min_probability=0.1, gamma2=1.0))
    mixer.initial(ctx(0))
    mixer.observe(stats(1, [4, 4], [3.0, 4.0]))
    mixer.law, mixer.fitted_at = _t([math.log(8.0), 1.0, 0.5, -10.0, 1.0, 0.5]).view(2, 3), 1
    # b's speed is e^-10 / 8 times a's: rho ~ [1, 4.5e-6] -> max(rho, 0.1) / 1.1
    assert mixer.update(ctx(1)).tolist() == pytest.approx([1 / 1.1, 0.1 / 1.1], abs=1e-6)


def test_until_a_fit_the_policy_is_the_prior() -> None:
    mixer = ADOMixer(ADOParams(prior=[0.3, 0.7], ignore_steps=2, fit_stride=1, smoothing_window=None))
    mixer.initial(ctx(0))
    for step in range(1, 5):
        mixer.observe(stats(step, [4, 4], [3.0 - 0.1 * step, 4.0 - 0.05 * step]))
    assert mixer.update(ctx(4)).tolist() == [0.3, 0.7]  # points at steps 3 and 4 only
    assert mixer.law is None and mixer.average is None
    mixer.observe(stats(5, [4, 4], [2.5, 3.75]))
    assert mixer.update(ctx(5, update=1)).tolist() != [0.3, 0.7]
    assert mixer.fitted_at == 5


def test_fits_take_every_strideth_smoothed_point_after_ignore_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, torch.Tensor] = {}

    def fake_fit(n: torch.Tensor, loss: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        seen.update(n=n, loss=loss, keep=keep)
        return torch.zeros(len(n), 3, dtype=torch.float64)

    monkeypatch.setattr(ado_module, "fit_power_laws", fake_fit)
    params = ADOParams(prior="uniform", ignore_steps=3, fit_stride=2, smoothing_window=5, fit_every=4)
    mixer = ADOMixer(params)
    mixer.initial(ctx(0))
    losses = [5.0, 4.0, 4.5, 3.0, 3.2, 2.9, 3.1, 2.5, 2.6, 2.4]
    for step, loss in enumerate(losses, start=1):
        mixer.observe(stats(step, [6, 2], [loss, loss + 1]))
    mixer.update(ctx(10))
    # steps 4..10 are after ignore_steps; every 2nd: steps 4, 6, 8, 10
    assert seen["keep"][0].nonzero().flatten().tolist() == [3, 5, 7, 9]
    assert seen["n"][0].tolist() == [8.0 * s for s in range(1, 11)]  # counts: total
    torch.testing.assert_close(seen["loss"][0], savgol_smooth(_t(losses), 5))
    assert mixer.fitted_at == 10
    mixer.observe(stats(11, [4, 4], [2.3, 3.3]))
    mixer.update(ctx(11, update=1))
    assert mixer.fitted_at == 10  # the next fit is due at step 14


def test_a_fit_that_is_not_finite_is_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    mixer = ADOMixer(ADOParams(prior="uniform", ignore_steps=0, fit_every=1, fit_stride=1))
    mixer.initial(ctx(0))
    law = _t([1.0, 1.0, 0.5, 1.0, 1.0, 0.4]).view(2, 3)
    mixer.law, mixer.fitted_at = law.clone(), 0
    monkeypatch.setattr(ado_module, "fit_power_laws", lambda *a: torch.full((2, 3), math.nan, dtype=torch.float64))
    for step in range(1, 4):
        mixer.observe(stats(step, [4, 4], [3.0, 4.0]))
    assert torch.isfinite(mixer.update(ctx(3))).all()
    assert torch.equal(mixer.law, law) and mixer.fitted_at == 0


# -- configuration and state -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"prior": "flat"}, "prior: expected 'natural' | 'uniform' | list\\[float\\], got 'flat'"),
        ({"prior": [0.5, 0.6]}, "prior: proportions must sum to 1"),
        ({"gamma1": 0}, r"gamma1: must be in \(0, 1\]"),
        ({"gamma2": 1.5}, r"gamma2: must be in \(0, 1\]"),
        ({"credit_exponent": -1}, "credit_exponent: must be finite and >= 0"),
        ({"min_probability": 1.0}, r"min_probability: must be in \[0, 1\)"),
        ({"fit_every": 0}, "fit_every: must be >= 1"),
        ({"fit_stride": 0}, "fit_stride: must be >= 1"),
        ({"ignore_steps": -1}, "ignore_steps: must be >= 0"),
        ({"smoothing_window": 0}, "smoothing_window: must be >= 1 or null"),
        ({"counts": "tokens"}, "counts: 'tokens' is not allowed; choose one of 'total', 'domain'"),
    ],
)
def test_bad_params(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_dataclass(ADOParams, raw, "datasteer.params")


def test_params_that_do_not_fit_the_domains() -> None:
    with pytest.raises(ConfigError, match=r"K x min_probability must be <= 1, got 4 x 0.3"):
        ADOMixer(ADOParams(min_probability=0.3)).check_domains(["a", "b", "c", "d"])
    with pytest.raises(ConfigError, match="expected 3 proportions"):
        ADOMixer(ADOParams(prior=[0.5, 0.5])).check_domains(["a", "b", "c"])


def test_state_round_trip_continues_identically() -> None:
    params = ADOParams(prior="uniform", ignore_steps=1, fit_every=3, fit_stride=1, smoothing_window=5)
    losses = [[5.0, 6.0], [4.4, 5.8], [4.0, 5.7], [3.7, 5.5], [3.5, 5.45], [3.3, 5.4], [3.2, 5.3], [3.1, 5.3]]

    def drive(mixer: ADOMixer, steps: range) -> list[list[float]]:
        out = []
        for step in steps:
            mixer.observe(stats(step, [5, 3] if step % 2 else [3, 5], losses[step - 1]))
            out.append(mixer.update(ctx(step, update=step)).tolist())
        return out

    a = ADOMixer(params)
    a.initial(ctx(0))
    drive(a, range(1, 6))
    assert a.law is not None and a.average is not None
    b = ADOMixer(params)
    b.load_state_dict(a.state_dict())
    assert drive(a, range(6, 9)) == drive(b, range(6, 9))
    assert a.fitted_at == b.fitted_at == 7
