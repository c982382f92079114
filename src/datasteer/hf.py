"""Public entry point for the Hugging Face ``Trainer`` integration.

from datasteer.hf import SteeringTrainer
"""

from __future__ import annotations

from transformers import Trainer

from datasteer.integrations.hf import STATE_FILE, IndexCollator, SteeringCallback, SteeringMixin

__all__ = ["STATE_FILE", "IndexCollator", "SteeringCallback", "SteeringMixin", "SteeringTrainer"]


class SteeringTrainer(SteeringMixin, Trainer):
    """``transformers.Trainer`` with data steering (see :class:`SteeringMixin`)."""
