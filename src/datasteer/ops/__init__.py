"""Model operations shared by every algorithm: per-sample losses (and, as they land,
embeddings, generation and gradient features), batched and distributed-aware."""

from datasteer.ops.embeddings import LocalEncoder, Pooling, embed, pool
from datasteer.ops.feature_store import (
    FeatureStore,
    FeatureWriter,
    fingerprint,
    mean_similarity,
    merge_topk,
    topk_similarity,
)
from datasteer.ops.generation import generate
from datasteer.ops.gradients import GradFeatureConfig, GradMethod, grad_features
from datasteer.ops.losses import IGNORE_INDEX, per_sample_loss, per_token_loss
from datasteer.ops.model_ops import INDEX_KEY, ModelOps
from datasteer.ops.projection import KroneckerProjection, ParamLayout, StreamingProjection

__all__ = [
    "IGNORE_INDEX",
    "INDEX_KEY",
    "FeatureStore",
    "FeatureWriter",
    "GradFeatureConfig",
    "GradMethod",
    "KroneckerProjection",
    "LocalEncoder",
    "ModelOps",
    "ParamLayout",
    "Pooling",
    "StreamingProjection",
    "embed",
    "fingerprint",
    "generate",
    "grad_features",
    "mean_similarity",
    "merge_topk",
    "per_sample_loss",
    "per_token_loss",
    "pool",
    "topk_similarity",
]
