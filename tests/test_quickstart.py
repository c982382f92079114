"""The quickstart's table and verdict, on hand-made metrics."""

from __future__ import annotations

from datasteer.quickstart import format_table, verdict


def metrics(prose: float, code: float, arithmetic: float, noise: float) -> dict[str, float]:
    values = {"prose": prose, "code": code, "arithmetic": arithmetic, "noise": noise}
    return {f"eval_{d}_eval_loss": v for d, v in values.items()}


def test_table_has_the_learnable_mean_and_the_mean_of_all_domains() -> None:
    results = {"scheduled": metrics(6.0, 6.5, 4.0, 7.0), "static uniform": metrics(6.3, 6.6, 4.2, 6.0)}
    lines = format_table(results).splitlines()
    assert lines[0].split() == ["domain", "scheduled", "static", "uniform", "difference"]
    learnable = next(line for line in lines if line.startswith("learnable mean")).split()
    assert learnable[2:] == ["5.5000", "5.7000", "-0.2000"]  # (6 + 6.5 + 4) / 3, (6.3 + 6.6 + 4.2) / 3
    everything = next(line for line in lines if line.startswith("mean (all)")).split()
    assert everything[2:] == ["5.8750", "5.7750", "+0.1000"]


def test_verdict_names_the_winner_on_the_learnable_domains_and_the_cost() -> None:
    won = {"scheduled": metrics(6.0, 6.5, 4.0, 7.0), "static uniform": metrics(6.3, 6.6, 4.2, 6.0)}
    assert verdict(won) == (
        "scheduled lowers the mean held-out loss of the learnable domains (prose, code, arithmetic) "
        "by 0.2000 nats against static uniform, at equal steps; noise +1.0000 (random tokens, not in that mean)."
    )
    lost = {"odm": metrics(6.4, 6.6, 4.2, 6.0), "static uniform": metrics(6.3, 6.6, 4.2, 6.0)}
    assert verdict(lost).startswith("odm raises the mean held-out loss of the learnable domains")
