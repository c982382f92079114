"""Property-based tests (hypothesis) of the config parser and the samplers.

The parser: random valid ``datasteer:`` blocks (one-paradigm and staged) parse to what
they say and build a plan; arbitrary blocks and command-line values either parse or raise
ConfigError, never another exception. The samplers: every served index lies in the pool,
the streams are permutations (of the pool, of a selection, of each domain) in blocks,
and a mixture serves each step ``floor`` or ``ceil`` of ``B * p`` samples of each domain,
as documented.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datasteer.config import PARADIGMS, SINGLE_KEYS, STAGED_KEYS, apply_overrides, load_steering, parse_scalar
from datasteer.errors import ConfigError
from datasteer.plan import build_plan
from datasteer.registry import registry_for
from datasteer.samplers import MixtureSampler, SelectionSampler, systematic_counts

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# `custom` imports the module its `path` names: not something to feed random text.
ALGORITHMS = {p: sorted(spec.name for spec in registry_for(p) if spec.name != "custom") for p in PARADIGMS}
REFERENCE = "models/reference"  # one path, so that two stages never name different reference models


def required_params(algorithm: str) -> dict[str, Any]:
    """Valid values for the params an algorithm requires (the others keep their defaults)."""
    required: dict[str, dict[str, Any]] = {
        "tsds": {"prepared": "prepared/tsds"},
        "doremi": {"reference_model": REFERENCE},
        "reducible": {"reference_model": REFERENCE},
        "rho_loss": {"reference_model": REFERENCE},
        "scheduled": {"schedule": [[0, [0.5, 0.25, 0.25]], [10, [0.0, 0.0, 1.0]]]},
    }
    return required.get(algorithm, {})


# --------------------------------------------------------------------------- strategies

counts = st.integers(min_value=0, max_value=10_000)
log_files = st.from_regex(r"[a-z][a-z0-9_]{0,8}(/[a-z0-9_]{1,8})?\.jsonl", fullmatch=True)


@st.composite
def schedules(draw: st.DrawFn, paradigm: str) -> dict[str, Any]:
    """A stage's schedule keys (weighting acts at every step: no update_every / max_updates)."""
    out: dict[str, Any] = {}
    if draw(st.booleans()):
        out["warmup_steps"] = draw(counts)
    if paradigm != "weight":
        if draw(st.booleans()):
            out["update_every"] = draw(st.integers(min_value=1, max_value=1000))
        if draw(st.booleans()):
            out["max_updates"] = draw(st.none() | st.integers(min_value=1, max_value=100))
    return out


@st.composite
def run_keys(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if draw(st.booleans()):
        out["seed"] = draw(st.none() | st.integers(min_value=0, max_value=2**31))
    if draw(st.booleans()):
        out["lag"] = draw(st.none() | st.integers(min_value=1, max_value=8))
    if draw(st.booleans()):
        out["log_file"] = draw(log_files)
    return out


@st.composite
def single_blocks(draw: st.DrawFn) -> dict[str, Any]:
    paradigm = draw(st.sampled_from(PARADIGMS))
    algorithm = draw(st.sampled_from(ALGORITHMS[paradigm]))
    block: dict[str, Any] = {"paradigm": paradigm, "algorithm": algorithm}
    block.update(draw(schedules(paradigm)))
    block.update(draw(run_keys()))
    params = required_params(algorithm)
    explicit: bool = draw(st.booleans())  # an empty params: block, or none
    if params or explicit:
        block["params"] = params
    return block


def composable(stages: dict[str, dict[str, Any]]) -> bool:
    """Combinations refused by design (build_plan says why): doremi trains on its own
    domain-weighted loss (no weight stage); tsds reads probabilities over the whole pool (no mixer)."""
    mix, select = stages.get("mix", {}).get("algorithm"), stages.get("select", {}).get("algorithm")
    return not (mix == "doremi" and "weight" in stages) and not (mix is not None and select == "tsds")


@st.composite
def staged_blocks(draw: st.DrawFn) -> dict[str, Any]:
    paradigms = draw(st.lists(st.sampled_from(PARADIGMS), min_size=1, max_size=3, unique=True))
    stages: dict[str, dict[str, Any]] = {}
    for paradigm in paradigms:
        algorithm = draw(st.sampled_from(ALGORITHMS[paradigm]))
        stage = {"algorithm": algorithm, **draw(schedules(paradigm))}
        if required_params(algorithm):
            stage["params"] = required_params(algorithm)
        stages[paradigm] = stage
    while not composable(stages):
        stages.pop("weight" if "weight" in stages else "select")
    return {**stages, **draw(run_keys())}


# Arbitrary YAML-like values, with keys that are often real ones (so the parser goes deep).
PARAM_NAMES = sorted(
    {f.name for p in PARADIGMS for spec in registry_for(p) for f in dataclasses.fields(spec.params_cls)}
)
KEYS = st.sampled_from(sorted({*SINGLE_KEYS, *STAGED_KEYS, *PARAM_NAMES})) | st.text(max_size=6)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**40), max_value=2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([*PARADIGMS, *(a for p in PARADIGMS for a in ALGORITHMS[p])])
    | st.text(max_size=8)
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4), max_leaves=12
)


# --------------------------------------------------------------------------- the parser


@FAST
@given(single_blocks())
def test_a_valid_one_paradigm_block_parses_to_what_it_says(block: dict[str, Any]) -> None:
    config = load_steering(block)
    (paradigm,) = config.paradigms
    stage = config.stages[paradigm]
    assert (paradigm, stage.algorithm) == (block["paradigm"], block["algorithm"])
    assert stage.warmup_steps == block.get("warmup_steps", 0)
    assert stage.update_every == block.get("update_every", 1)
    assert stage.max_updates == block.get("max_updates")
    assert (config.seed, config.lag) == (block.get("seed"), block.get("lag"))
    assert config.log_file == block.get("log_file", "steering.jsonl")
    assert dataclasses.is_dataclass(stage.params)
    plan = build_plan(config)
    assert plan.config.describe() == f"{paradigm}/{stage.algorithm}"


@FAST
@given(staged_blocks())
def test_a_valid_staged_block_parses_in_composition_order_and_builds(block: dict[str, Any]) -> None:
    config = load_steering(block)
    assert config.paradigms == tuple(p for p in PARADIGMS if p in block)
    for paradigm in config.paradigms:
        assert config.stages[paradigm].algorithm == block[paradigm]["algorithm"]
        assert config.stages[paradigm].warmup_steps == block[paradigm].get("warmup_steps", 0)
    plan = build_plan(block)
    assert list(plan.algorithms) == list(config.paradigms)


@FAST
@given(VALUES | st.dictionaries(KEYS, VALUES, max_size=6))
def test_any_block_parses_or_is_one_config_error(block: Any) -> None:
    try:
        build_plan(block) if isinstance(block, dict) else load_steering(block)
    except ConfigError as err:
        assert str(err) and "\n" not in str(err)


@FAST
@given(
    st.sampled_from(["datasteer.params.proportions", "max_steps", "datasteer.update_every", "a.b.c"]),
    st.text(max_size=12),
)
def test_any_override_value_parses_or_is_one_config_error(key: str, text: str) -> None:
    config = {"max_steps": 3, "datasteer": {"paradigm": "mix", "algorithm": "static"}}
    try:
        parse_scalar(text)
        result = apply_overrides(config, [f"{key}={text}"])
    except ConfigError as err:
        assert "\n" not in str(err)
        return
    node = result
    for part in key.split(".")[:-1]:
        node = node[part]
    assert key.split(".")[-1] in node
    assert config == {"max_steps": 3, "datasteer": {"paradigm": "mix", "algorithm": "static"}}  # a copy was changed


# --------------------------------------------------------------------------- the samplers


@FAST
@given(
    st.lists(st.floats(min_value=0, max_value=1), min_size=1, max_size=6).filter(lambda w: sum(w) > 1e-3),
    st.integers(min_value=1, max_value=64),
    st.floats(min_value=0, max_value=1 - 1e-9),  # see the next test for u within float error of 1
)
def test_systematic_counts_round_each_share_and_keep_the_total(weights: list[float], total: int, u: float) -> None:
    p = np.asarray(weights) / math.fsum(weights)
    counts = systematic_counts(p, total, u)
    assert counts.sum() == total and (counts >= 0).all()
    expected = total * p
    # floor or ceil of B * p, up to the float error of the cumulative sum at an exact integer
    assert np.all((counts >= np.floor(expected - 1e-9)) & (counts <= np.ceil(expected + 1e-9)))
    assert np.all(counts[p == 0] == 0)


def test_systematic_counts_keep_the_total_when_u_is_next_to_1() -> None:
    """Found by the property above: u = 1 - 2**-52 (torch.rand can draw it, about once in 1e15 steps)."""
    assert systematic_counts(np.array([1.0]), 3, 1 - 2**-52).sum() == 3


@FAST
@given(
    st.integers(min_value=1, max_value=120),
    st.integers(min_value=1, max_value=32),
    st.integers(min_value=0, max_value=2**31),
)
def test_the_warm_up_stream_is_the_pool_shuffled_block_by_block(pool: int, batch: int, seed: int) -> None:
    sampler = SelectionSampler(pool, batch, seed)
    steps = -(-3 * pool // batch)  # three passes over the pool
    stream = np.concatenate([sampler.indices_for_step(s) for s in range(1, steps + 1)])
    assert stream.min() >= 0 and stream.max() < pool
    for start in range(0, len(stream) - pool + 1, pool):
        assert sorted(stream[start : start + pool].tolist()) == list(range(pool))


@FAST
@given(
    st.integers(min_value=1, max_value=80),
    st.integers(min_value=1, max_value=16),
    st.integers(min_value=0, max_value=2**31),
    st.data(),
)
def test_a_selection_is_served_whole_before_any_of_it_repeats(
    pool: int, batch: int, seed: int, data: st.DataObject
) -> None:
    chosen = data.draw(st.lists(st.integers(min_value=0, max_value=pool - 1), min_size=1, max_size=40))
    first = data.draw(st.integers(min_value=1, max_value=5))
    sampler = SelectionSampler(pool, batch, seed)
    sampler.add_selection(first, np.asarray(chosen))
    steps = -(-3 * len(chosen) // batch)
    stream = np.concatenate([sampler.indices_for_step(s) for s in range(first, first + steps)])
    for start in range(0, len(stream) - len(chosen) + 1, len(chosen)):
        assert Counter(stream[start : start + len(chosen)].tolist()) == Counter(chosen)


@st.composite
def mixtures(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(domain of each pool row, proportions, global batch, seed); a domain with no rows gets p = 0."""
    sizes = draw(st.lists(st.integers(min_value=0, max_value=25), min_size=1, max_size=5))
    if sum(sizes) == 0:
        sizes[0] = 1
    weights = [draw(st.floats(min_value=0, max_value=1)) if n else 0.0 for n in sizes]
    if math.fsum(weights) < 1e-3:
        weights = [1.0 if n else 0.0 for n in sizes]
    p = np.asarray(weights) / math.fsum(weights)
    order = draw(st.permutations(np.repeat(np.arange(len(sizes)), sizes).tolist()))
    return np.asarray(order, dtype=np.int64), p, draw(st.integers(1, 24)), draw(st.integers(0, 2**31))


@FAST
@given(mixtures(), st.integers(min_value=1, max_value=12))
def test_a_mixture_serves_each_domain_its_rounded_share_without_replacement(
    mixture: tuple[np.ndarray, np.ndarray, int, int], steps: int
) -> None:
    domains, p, batch, seed = mixture
    k = len(p)
    sampler = MixtureSampler(domains, k, batch, seed)
    sampler.add_plan(1, p)
    drawn = [Counter[int]() for _ in range(k)]
    for step in range(1, steps + 1):
        served = sampler.indices_for_step(step)
        assert len(served) == batch and served.min() >= 0 and served.max() < len(domains)
        per_domain = np.bincount(domains[served], minlength=k)
        assert per_domain.tolist() == sampler.domain_counts(step).tolist()
        expected = batch * p
        assert np.all((per_domain >= np.floor(expected - 1e-9)) & (per_domain <= np.ceil(expected + 1e-9)))
        for index in served.tolist():
            drawn[domains[index]][index] += 1
        # Without replacement until a domain is used up, then reshuffled: every member of a
        # domain has been drawn floor(t / n) or ceil(t / n) times after t draws from it.
        for d in range(k):
            members = np.flatnonzero(domains == d).tolist()
            t = sum(drawn[d].values())
            if members:
                times = [drawn[d][m] for m in members]
                assert min(times) >= t // len(members) and max(times) <= -(-t // len(members))


@FAST
@given(mixtures(), st.data())
def test_under_a_selection_a_mixture_draws_each_domain_from_its_selected_rows(
    mixture: tuple[np.ndarray, np.ndarray, int, int], data: st.DataObject
) -> None:
    domains, p, batch, seed = mixture
    k = len(p)
    chosen = sorted(set(data.draw(st.lists(st.integers(0, len(domains) - 1), min_size=1, max_size=30))))
    sampler = MixtureSampler(domains, k, batch, seed)
    sampler.add_plan(1, p)
    sampler.add_selection(2, np.asarray(chosen))
    selected_domains = set(domains[chosen].tolist())
    sampler.indices_for_step(1)  # the stream is drawn in order, as a data loader does
    for step in range(2, 8):
        served = sampler.indices_for_step(step)
        assert np.bincount(domains[served], minlength=k).tolist() == sampler.domain_counts(step).tolist()
        for index in served.tolist():
            # a domain with selected rows is drawn from them; one with none is drawn whole
            if int(domains[index]) in selected_domains:
                assert index in chosen
