"""Model operations shared by the algorithms, batched and distributed-aware.

:class:`ModelOps` binds them to the live model and the training pool. The modules:

* ``losses``: per-sample and per-token losses; ``reference``: a frozen reference model's
  losses (DoReMi);
* ``embeddings``: pooled hidden states, and a local sentence encoder;
* ``gradients`` and ``projection``: projected, optionally Adam-preconditioned per-sample
  gradient features;
* ``moe``: expert loads of MoE models, router lookup and freezing;
* ``policy_gradient`` and ``rewards``: NICE's reward-weighted policy-gradient features;
* ``similarity``: chunked cosine scoring (NEAR's neighbours, LESS's mean cosine);
* ``feature_store``: each rank's share of the pool features on disk, scored in chunks;
* ``clustering``: k-means, k-center, LSH and random groupings of embedding rows;
* ``prepared``: the fingerprinted files that ``datasteer prepare`` writes;
* ``sharding``: working with ZeRO-3 / FSDP2-sharded parameters.
"""

from datasteer.ops.embeddings import LocalEncoder, Pooling, embed, pool
from datasteer.ops.feature_store import FeatureStore
from datasteer.ops.gradients import GradFeatureConfig, GradMethod, grad_features
from datasteer.ops.losses import IGNORE_INDEX, per_sample_loss, per_token_loss
from datasteer.ops.model_ops import INDEX_KEY, ModelOps
from datasteer.ops.projection import KroneckerProjection, ParamLayout, StreamingProjection
from datasteer.ops.similarity import mean_similarity, topk_similarity

__all__ = [
    "IGNORE_INDEX",
    "INDEX_KEY",
    "FeatureStore",
    "GradFeatureConfig",
    "GradMethod",
    "KroneckerProjection",
    "LocalEncoder",
    "ModelOps",
    "ParamLayout",
    "Pooling",
    "StreamingProjection",
    "embed",
    "grad_features",
    "mean_similarity",
    "per_sample_loss",
    "per_token_loss",
    "pool",
    "topk_similarity",
]
