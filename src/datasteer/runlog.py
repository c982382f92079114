"""The run record: ``OUTPUT_DIR/steering.jsonl``, one JSON object per steering event.

Only rank 0 writes. On resume, records after the checkpoint's step are dropped so that a
resumed run's file matches an uninterrupted run's. Rewrites are atomic (see
:mod:`datasteer.atomic`); a last line cut short by a crash while it was appended is
dropped with a warning, while damage anywhere else is an error.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from datasteer import atomic
from datasteer.errors import SteeringStateError

logger = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class RunLog:
    """Appends event records to a JSON-lines file."""

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (a flat-ish dict of JSON-able values)."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(_clean(record), sort_keys=False) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records whose ``step`` is greater than ``step``, and any closing record (used on
        resume: the resumed run writes its own)."""
        if not self.enabled or not self.path.exists():
            return

        kept = [
            line
            for line, record in _parsed_lines(self.path)
            if record["step"] <= step and record.get("paradigm") != "end"
        ]
        atomic.write_text(self.path, "".join(line + "\n" for line in kept))

    def start_fresh(self) -> None:
        """Empty the file of a previous run (a new, non-resumed run), in one atomic step."""
        if self.enabled and self.path.exists():
            atomic.write_text(self.path, "")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All records of a run log, in order.

    A last line that is not valid JSON (a crash while it was written) is dropped with a
    warning.

    Raises:
        SteeringStateError: a line before the last is not valid JSON.
    """
    return [record for _, record in _parsed_lines(path)]


def _parsed_lines(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """``(line, record)`` of each record line (see :func:`read_records`)."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    parsed = []
    for number, line in enumerate(lines, start=1):
        try:
            parsed.append((line, json.loads(line)))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise SteeringStateError(f"{path}: line {number} is not a JSON record ({err})") from None
            logger.warning("%s: its last line is cut short (a crash while it was written); dropped", path)
    return parsed
