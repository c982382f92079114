"""Claim (real model): the online mixers (ODM, Aioli, ADO) and DoReMi change SmolLM2-135M's
held-out loss per domain against the uniform mixture at equal steps and tokens.

    .venv/bin/python -m experiments.smollm2_mix         # needs ./install.sh --with-smollm2

DoReMi is step 3 (static at the proportions its step-2 proxy learned against the ``static``
run as reference model); the proxy is a helper run, not a row.
"""

from __future__ import annotations

import sys

from experiments.smollm2 import ARMS, run

if __name__ == "__main__":
    sys.exit(
        run(
            "smollm2_mix",
            "SmolLM2-135M: mixers vs the uniform mixture",
            "static",
            [ARMS[name] for name in ("static", "odm", "aioli", "ado", "doremi_proxy", "doremi")],
            doc=__doc__,
        )
    )
