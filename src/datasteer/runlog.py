"""The run record: ``OUTPUT_DIR/steering.jsonl``, one JSON object per steering event.

Only rank 0 writes. On resume, records after the checkpoint's step are dropped so that a
resumed run's file matches an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


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

        def keep(record: dict[str, Any]) -> bool:
            return bool(record["step"] <= step and record.get("paradigm") != "end")

        kept = [line for line in self.path.read_text().splitlines() if line and keep(json.loads(line))]
        self.path.write_text("".join(line + "\n" for line in kept))

    def start_fresh(self) -> None:
        """Remove a previous run's file (a new, non-resumed run)."""
        if self.enabled and self.path.exists():
            self.path.unlink()


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All records of a run log, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
