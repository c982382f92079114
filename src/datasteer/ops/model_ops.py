"""Model operations bound to the live model and the training pool, sharded over ranks.

Every method takes pool indices, gives each rank a contiguous share of them, runs the
batched operation on that share and gathers the results in index order, so that every
rank holds the same tensor (computed once, not once per rank). Pool features too large to
gather (gradient features, embeddings) are also kept on disk instead:
:meth:`ModelOps.gradient_feature_store` and :meth:`ModelOps.embedding_store` write each
rank's rows to its own :class:`~datasteer.ops.feature_store.FeatureStore` as they are
computed, and the gathering methods are those stores read back.

With sharded parameters (DeepSpeed ZeRO-3, FSDP2; see :mod:`datasteer.ops.sharding`) every
forward gathers parameters collectively, so every rank runs the same number of batches:
a shorter share is padded with one-row dummy batches whose results are dropped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from datasteer import dist
from datasteer.errors import ConfigError, SteeringStateError
from datasteer.ops.embeddings import Pooling, iter_embed
from datasteer.ops.feature_store import FeatureStore
from datasteer.ops.gradients import GradFeatureConfig, iter_grad_features
from datasteer.ops.keys import INDEX_KEY
from datasteer.ops.losses import per_sample_loss
from datasteer.ops.moe import expert_loads
from datasteer.ops.policy_gradient import PolicyGradientFeatures, Sampling, policy_gradient_features
from datasteer.ops.rewards import RewardFn, Target, split_prompt_response
from datasteer.ops.sharding import full_parameters, padded_batch_count, param_sharding

__all__ = ["INDEX_KEY", "ModelOps"]


class _Rows:
    """Rows ``indices`` of a data set, renumbered from 0 (a view, nothing copied)."""

    def __init__(self, base: Any, indices: Sequence[int]) -> None:
        self.base = base
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.base[self.indices[i]]


def row_lengths(dataset: Any, indices: Sequence[int]) -> list[int]:
    """Token count (``len(input_ids)``) of rows ``indices``.

    A ``datasets.Dataset`` (or a row view of one) is read from its Arrow column, without
    decoding a row; anything else one row at a time.
    """
    if isinstance(dataset, _Rows):
        return row_lengths(dataset.base, [dataset.indices[i] for i in indices])
    lengths = _arrow_lengths(dataset)
    if lengths is not None:
        return lengths[np.asarray(indices, dtype=np.int64)].tolist() if len(indices) else []
    return [len(dataset[i]["input_ids"]) for i in indices]


def _arrow_lengths(dataset: Any) -> np.ndarray | None:
    """Length of every row's ``input_ids`` of a ``datasets.Dataset`` in its own row order, or
    ``None`` for anything else."""
    try:
        import pyarrow.compute as pc
        from datasets import Dataset
    except ImportError:  # pragma: no cover - datasets is a dependency
        return None
    if not isinstance(dataset, Dataset) or "input_ids" not in dataset.column_names:
        return None
    lengths = pc.list_value_length(dataset.data.column("input_ids")).to_numpy(zero_copy_only=False)
    mapping = dataset._indices  # rows of a select/shuffle: a column of positions in the table
    return lengths if mapping is None else lengths[mapping.column(0).to_numpy()]


def _key_of(indices: Sequence[int] | torch.Tensor) -> tuple[int, ...]:
    return tuple(torch.as_tensor(indices, dtype=torch.long).tolist())


class _Batches:
    """Collated batches of some pool rows: iterable, with a length (for progress totals)."""

    def __init__(self, ops: ModelOps, rows: list[list[int]]) -> None:
        self.ops = ops
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for chunk in self.rows:
            batch = self.ops.collator([self.ops.dataset[i] for i in chunk])
            batch.pop(INDEX_KEY, None)
            yield batch


class ModelOps:
    """Batched passes of the live model over pool samples, for algorithms that need them.

    Args:
        model: the model being trained (unwrapped).
        dataset: the training pool (indexable, rows as the collator expects them).
        collator: turns a list of rows into a batch dict with ``labels``.
        batch_size: rows per forward pass.
        device: where batches go.
        targets: the target (evaluation) sets, each bound to its own rows and collator.
        optimizer: the live optimizer (for optimizer-aware gradient features), if any.
        name: the data set's name (an evaluation set's key, e.g. a domain), if it has one.
        scratch_dir: where feature stores (:class:`~datasteer.ops.feature_store.FeatureStore`)
            make their temporary directories (``None``: the system's temporary directory).
        memoize: keep what :meth:`embeddings` and (plain) :meth:`gradient_features` return,
            and return it again for the same rows and settings. For a target set, whose
            features are asked for once per domain when a selector chooses within domains:
            the model does not change within one update, and the operations are built anew
            for each update.
        reference: the run's frozen reference model (see
            :class:`~datasteer.capabilities.ComparesToReference`), for :meth:`reference_losses`.

    Each rank's rows are taken longest first, so that a batch holds rows of about one
    length and the collator pads little (the results come back in the order asked for).
    """

    def __init__(
        self,
        model: nn.Module,
        dataset: Any,
        collator: Callable[[list[Any]], dict[str, Any]],
        batch_size: int,
        device: torch.device,
        targets: Sequence[ModelOps] = (),
        optimizer: torch.optim.Optimizer | None = None,
        name: str | None = None,
        scratch_dir: str | None = None,
        memoize: bool = False,
        reference: nn.Module | None = None,
    ) -> None:
        self.model = model
        self.dataset = dataset
        self.collator = collator
        self.batch_size = batch_size
        self.device = device
        self.targets = tuple(targets)
        self.optimizer = optimizer
        self.name = name
        self.scratch_dir = scratch_dir
        self.memoize = memoize
        self.reference = reference
        self._memo: dict[tuple[Any, ...], torch.Tensor] = {}

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ModelOps:
        """The same operations over rows ``indices`` of the pool, renumbered from 0 (the
        targets, optimizer and reference model are shared)."""
        rows = _Rows(self.dataset, torch.as_tensor(indices, dtype=torch.long).tolist())
        return ModelOps(
            self.model,
            rows,
            self.collator,
            self.batch_size,
            self.device,
            self.targets,
            self.optimizer,
            self.name,
            self.scratch_dir,
            reference=self.reference,
        )

    def target_embeddings(self, *, layer: int = -1, pooling: Pooling = "mean", normalize: bool = True) -> torch.Tensor:
        """Embeddings of every row of every target set, concatenated in order.

        Raises:
            SteeringStateError: the run has no target (evaluation) set.
        """
        if not self.targets:
            raise SteeringStateError("this algorithm needs target samples: give the run an evaluation set")
        parts = [
            t.embeddings(range(len(t.dataset)), layer=layer, pooling=pooling, normalize=normalize) for t in self.targets
        ]
        return torch.cat(parts)

    def _my_share(self, indices: Sequence[int] | torch.Tensor) -> tuple[list[int], int]:
        idx = torch.as_tensor(indices, dtype=torch.long).tolist()
        start, stop = dist.shard_bounds(len(idx))
        return idx[start:stop], len(idx)

    def batches(self, indices: Sequence[int]) -> _Batches:
        """Collated batches of the given pool rows, in that order, without the steering index."""
        rows = list(indices)
        return _Batches(self, [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)])

    def _rank_batches(self, mine: list[int], indices: Sequence[int] | torch.Tensor) -> _Batches:
        """This rank's batches, then dummy batches of one row (results to be dropped).

        Sharded parameters: as many dummies as make every rank's batch count equal (their
        gathers are collective). Otherwise one dummy only when the share is empty, so that
        the caller still learns the width of a row.
        """
        batches = self.batches(mine)
        if param_sharding(self.model) != "none":
            need = padded_batch_count(len(indices), dist.world_size(), self.batch_size) - len(batches)
        else:
            need = 0 if mine or len(indices) == 0 else 1
        filler = (mine or torch.as_tensor(indices, dtype=torch.long).tolist())[:1]
        batches.rows.extend([filler] * need)
        return batches

    def _per_row(
        self, indices: Sequence[int] | torch.Tensor, compute: Callable[[_Batches], torch.Tensor]
    ) -> torch.Tensor:
        """``compute`` over this rank's share of ``indices`` (longest rows first, then the
        dummy batches), its rows put back in the order of ``indices`` and gathered from
        every rank."""
        rows, order = self._longest_first(indices)
        local = compute(self._rank_batches(rows, indices))[: len(rows)]
        restored = torch.empty_like(local)
        restored[torch.as_tensor(order, dtype=torch.long)] = local
        return dist.gather_rows(restored, len(indices))

    def _longest_first(self, indices: Sequence[int] | torch.Tensor) -> tuple[list[int], list[int]]:
        """This rank's share of ``indices``, longest rows first, and where each came from:
        ``rows[i]`` is ``share[order[i]]`` (ties keep their order)."""
        mine, _ = self._my_share(indices)
        lengths = row_lengths(self.dataset, mine)
        order = sorted(range(len(mine)), key=lambda i: -lengths[i])
        return [mine[i] for i in order], order

    def _parameters_for(self, config: GradFeatureConfig) -> contextlib.AbstractContextManager[Any]:
        """Whole parameters for a gradient pass: ``logra`` runs through the engine's own
        layer-by-layer gathering; the other methods need whole parameters for
        ``functional_call`` (one read-only gather, see :func:`full_parameters`)."""
        return contextlib.nullcontext() if config.method == "logra" else full_parameters(self.model)

    @torch.no_grad()
    def sample_losses(self, indices: Sequence[int] | torch.Tensor, desc: str = "per-sample loss") -> torch.Tensor:
        """Token-mean loss of each pool sample in ``indices`` (eval mode, no gradient).

        Returns a float32 CPU tensor in the order of ``indices``, the same on every rank.
        """
        return self._per_row(indices, lambda batches: self._losses(batches, desc, self.model))

    @torch.no_grad()
    def reference_losses(self, indices: Sequence[int] | torch.Tensor, desc: str = "reference loss") -> torch.Tensor:
        """Token-mean loss of each pool sample in ``indices`` under the reference model, as
        :meth:`sample_losses` computes it under the live model (same batches, same loss).

        Returns a float32 CPU tensor in the order of ``indices``, the same on every rank.

        Raises:
            SteeringStateError: the operations were built without a reference model.
        """
        reference = self.reference
        if reference is None:
            raise SteeringStateError(
                "reference_losses: no reference model was loaded (the algorithm must declare ComparesToReference)"
            )
        if next(reference.parameters()).device != self.device:
            reference.to(self.device)
        return self._per_row(indices, lambda batches: self._losses(batches, desc, reference))

    def _losses(self, batches: _Batches, desc: str, model: nn.Module) -> torch.Tensor:
        was_training = model.training
        model.eval()
        out: list[torch.Tensor] = []
        try:
            with tqdm(
                total=sum(map(len, batches.rows)), desc=desc, unit="sample", disable=dist.rank() != 0, leave=False
            ) as bar:
                for batch in batches:
                    labels = batch.pop("labels").to(self.device)
                    inputs = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                    logits = model(**inputs).logits
                    out.append(per_sample_loss(logits, labels)[0].float().cpu())
                    bar.update(len(labels))
        finally:
            model.train(was_training)
        return torch.cat(out) if out else torch.empty(0)

    def _store(
        self, indices: Sequence[int] | torch.Tensor, mine: list[int], order: list[int], blocks: Iterator[torch.Tensor]
    ) -> FeatureStore:
        """This rank's rows of ``blocks`` (its batches of rows ``mine``, in ``order``
        of its share, then dummies) written to a new store."""
        store = FeatureStore(len(indices), directory=self.scratch_dir, order=order)
        try:
            for block in blocks:
                # dummy rows are dropped; an empty share still learns the width from one
                store.append(block[: len(mine) - store.rows])
        except BaseException:
            store.close()
            raise
        return store

    def embedding_store(
        self,
        indices: Sequence[int] | torch.Tensor,
        *,
        layer: int = -1,
        pooling: Pooling = "mean",
        normalize: bool = True,
    ) -> FeatureStore:
        """Pooled hidden states of each pool sample (see :func:`datasteer.ops.embed`), on disk.

        Each rank writes the rows of its share as they are computed and keeps them; nothing
        is gathered (see :class:`~datasteer.ops.feature_store.FeatureStore`). Close the store.
        """
        mine, order = self._longest_first(indices)
        batches = self._rank_batches(mine, indices)
        blocks = iter_embed(self.model, batches, layer=layer, pooling=pooling, normalize=normalize, device=self.device)
        return self._store(indices, mine, order, blocks)

    def embeddings(
        self,
        indices: Sequence[int] | torch.Tensor,
        *,
        layer: int = -1,
        pooling: Pooling = "mean",
        normalize: bool = True,
    ) -> torch.Tensor:
        """:meth:`embedding_store`'s rows, gathered: ``(n, h)``, the same on every rank."""
        key = ("embeddings", _key_of(indices), layer, pooling, normalize)
        if key in self._memo:
            return self._memo[key]
        with self.embedding_store(indices, layer=layer, pooling=pooling, normalize=normalize) as store:
            return self._remember(key, store.to_tensor())

    def gradient_feature_store(
        self,
        indices: Sequence[int] | torch.Tensor,
        config: GradFeatureConfig | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> FeatureStore:
        """Projected per-sample gradient features (see :func:`datasteer.ops.grad_features`), on disk.

        Each rank computes its share of the samples and writes the projected rows batch by
        batch to its own :class:`~datasteer.ops.feature_store.FeatureStore`; nothing is
        gathered, never full gradients. The projection is seeded, the same on every rank.
        DDP: each rank uses its own replica. ZeRO-3 / FSDP2: ``logra`` runs through the
        engine's layer-by-layer gathering; ``vmap``/``dense``/``loop`` need whole
        parameters for ``functional_call`` and run inside
        :func:`datasteer.ops.sharding.full_parameters` (one read-only gather for the pass).
        Close the store.

        Raises:
            ConfigError: Adam preconditioning (``optimizer``) on sharded parameters: the
                optimizer's moments are partitioned (ZeRO-3 flattens them), so use plain
                gradient features there.
        """
        config = config or GradFeatureConfig()
        sharding = param_sharding(self.model)
        if optimizer is not None and sharding != "none":
            raise ConfigError(
                f"Adam-preconditioned gradient features are not supported with {sharding} sharded parameters "
                "(the optimizer's moments are partitioned); turn the algorithm's `adam` parameter off"
            )
        mine, order = self._longest_first(indices)
        with self._parameters_for(config):
            blocks = iter_grad_features(self.model, self._rank_batches(mine, indices), config, optimizer=optimizer)
            return self._store(indices, mine, order, blocks)

    def gradient_features(
        self,
        indices: Sequence[int] | torch.Tensor,
        config: GradFeatureConfig | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> torch.Tensor:
        """:meth:`gradient_feature_store`'s rows, gathered: ``(n, k)``, the same on every rank.

        Raises:
            ConfigError: as :meth:`gradient_feature_store`.
        """
        key = ("gradient_features", _key_of(indices), config)
        if optimizer is None and key in self._memo:
            return self._memo[key]
        with self.gradient_feature_store(indices, config, optimizer=optimizer) as store:
            features = store.to_tensor()
        return features if optimizer is not None else self._remember(key, features)

    def _remember(self, key: tuple[Any, ...], value: torch.Tensor) -> torch.Tensor:
        if self.memoize:
            self._memo[key] = value
        return value

    def expert_loads(
        self, indices: Sequence[int] | torch.Tensor, *, top_k: int | None = None, desc: str = "expert loads"
    ) -> torch.Tensor:
        """Top-k routed-token counts of each sample per MoE layer and expert, ``(n, L, E)``
        (see :func:`datasteer.ops.moe.expert_loads`), the same on every rank."""
        return self._per_row(
            indices,
            lambda batches: expert_loads(
                self.model, batches, top_k=top_k, device=self.device, total=sum(map(len, batches.rows)), desc=desc
            ),
        )

    def policy_gradient_features(
        self,
        indices: Sequence[int] | torch.Tensor,
        config: GradFeatureConfig,
        *,
        reward: RewardFn,
        sampling: Sampling,
        seed: int,
        policy: nn.Module | None = None,
    ) -> PolicyGradientFeatures:
        """NICE's reward-weighted policy-gradient features of rows ``indices`` of this (SFT) set.

        See :func:`datasteer.ops.policy_gradient.policy_gradient_features` (``config.normalize``
        must be off). Targets are cut into groups of ``batch_size // (mc_samples + 1)``
        (at least 1), the last one filled up with row ``indices[0]``; ranks take contiguous
        shares of the groups, and a rank with fewer groups repeats group 0 (discarded). So
        the sampling and gradient batches, hence the rows, do not depend on the number of
        ranks, and every rank makes the same number of ``generate`` calls and gradient
        batches (with ``logra`` on sharded parameters their gathers are collective). On
        sharded parameters each ``generate`` call also steps in sync across ranks, until
        every rank's responses have ended (see :func:`~datasteer.ops.policy_gradient.sample_responses`).

        Raises:
            ConfigError: a row has no prompt or no response (not a prompt/response row).
        """
        idx = torch.as_tensor(indices, dtype=torch.long).tolist()
        targets: list[Target] = []
        for i in idx:
            try:
                targets.append(split_prompt_response(self.dataset[i]))
            except ValueError as err:
                where = f"evaluation set {self.name!r}" if self.name else "the evaluation set"
                raise ConfigError(
                    f"eval_dataset: row {i} of {where}: {err}; NICE needs prompt/response rows (stage: sft)"
                ) from err
        if not idx:
            raise ValueError("policy_gradient_features needs at least one row")
        size = max(1, self.batch_size // (sampling.mc_samples + 1))
        n_groups = -(-len(idx) // size)
        start, stop = dist.shard_bounds(n_groups)
        per = -(-n_groups // dist.world_size())
        groups = [*range(start, stop), *[0] * (per - (stop - start))]
        slots = [p if p < len(idx) else 0 for g in groups for p in range(g * size, (g + 1) * size)]
        with self._parameters_for(config):  # logra samples through the engine's hooks too
            local = policy_gradient_features(
                self.model,
                [targets[p] for p in slots],
                [idx[p] for p in slots],
                config,
                reward=reward,
                sampling=sampling,
                seed=seed,
                group_size=size,
                policy=policy,
            )
        # the no-signal flags travel as one more column, in the same gather as the rows
        joined = torch.cat([local.features, local.no_signal.float().unsqueeze(1)], dim=1)
        joined = joined.view(per, size, -1)[: stop - start]
        rows = dist.gather_rows(joined, n_groups).reshape(n_groups * size, -1)[: len(idx)]
        return PolicyGradientFeatures(rows[:, :-1].contiguous(), rows[:, -1] > 0)
