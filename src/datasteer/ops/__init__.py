"""Model operations shared by every algorithm: per-sample losses (and, as they land,
embeddings, generation and gradient features), batched and distributed-aware."""

from datasteer.ops.losses import IGNORE_INDEX, per_sample_loss, per_token_loss
from datasteer.ops.model_ops import INDEX_KEY, ModelOps

__all__ = ["IGNORE_INDEX", "INDEX_KEY", "ModelOps", "per_sample_loss", "per_token_loss"]
