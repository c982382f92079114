"""Non-finite numbers never enter a steering decision.

A NaN or infinite per-sample loss, reward, excess loss or feature row is left out of a
decision (never replaced by 0) and counted; the counts reach each stage's record as
``nonfinite``. These helpers are shared by the drivers (which filter the training
batches once for every algorithm) and by the algorithms that compute numbers of their own.
"""

from __future__ import annotations

import torch


def finite_rows(values: torch.Tensor) -> torch.Tensor:
    """``(n,)`` bool: whether row i of ``values`` (``(n,)`` or ``(n, d)``) is all finite."""
    ok = torch.isfinite(values)
    return ok if ok.ndim <= 1 else ok.flatten(1).all(dim=1)
