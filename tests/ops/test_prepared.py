"""Tests of datasteer.ops.prepared's fingerprint: what changes it, and that it stays stable."""

from __future__ import annotations

import numpy as np
import pytest

from datasteer.ops.prepared import fingerprint


def test_fingerprint_tracks_data_and_settings() -> None:
    data = {"indices": [0, 1, 2], "input_ids": [[5, 6], [7], [8, 9, 10]]}
    settings = {"method": "mean", "layer": -1, "seed": 0}
    base = fingerprint(data=data, settings=settings)
    assert base == fingerprint(data={**data}, settings=dict(settings))
    assert fingerprint(data={**data, "indices": [0, 1, 3]}, settings=settings) != base
    assert fingerprint(data={**data, "input_ids": [[5, 6], [7], [8, 9, 11]]}, settings=settings) != base
    assert fingerprint(data=data, settings={**settings, "layer": -2}) != base
    # Concatenation does not collide: the structure is hashed, not just the bytes.
    assert fingerprint(data=["ab"], settings={}) != fingerprint(data=["a", "b"], settings={})
    assert fingerprint(data=[1], settings={}) != fingerprint(data=[True], settings={})
    with pytest.raises(TypeError, match="cannot fingerprint"):
        fingerprint(data=object(), settings={})


def test_fingerprint_is_stable() -> None:
    # Pinned: a changed digest makes every file written by `datasteer prepare` invalid.
    data = {"pool": [[5, 6], [7]], "domains": np.array([0, 1], dtype=np.int64)}
    assert fingerprint(data=data, settings={"kind": "near", "k": 3}) == (
        "9602d1ffb371acb75f9115df5ede583b6a231f3f78b99502dcc1c8371bc1d19b"
    )
