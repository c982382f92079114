"""Offline preparation for selectors that work from precomputed neighbours: ``datasteer prepare``.

``datasteer prepare near|tsds CONFIG`` loads the run exactly as ``datasteer train`` does
(LLaMA-Factory's ``get_train_args``, ``load_tokenizer``, the same per-dataset
``get_dataset`` that makes each dataset a domain, ``load_model``), so the pool rows and
their order are those the training run will see. It then

1. embeds the pool and the target (evaluation) rows, batched: pooled hidden states of the
   training model as loaded before training, or a local sentence encoder over the decoded
   texts;
2. builds a faiss index over the L2-normalised pool embeddings (exact inner product, or
   IVF for large pools) and retrieves each target's nearest pool samples; faiss pads short
   result lists with ``-1``, which is kept as padding and never used as an index;
3. writes NEAR's neighbour lists or TSDS's probabilities with a fingerprint of the pool,
   the targets and the settings (see :mod:`datasteer.ops.prepared`), which the online
   selector checks.

:func:`prepare_selection` does steps 1-3 for datasets and a model already in memory (a
plain ``transformers.Trainer`` user calls it directly); :func:`prepare` is the CLI's path.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from datasteer.errors import ConfigError
from datasteer.ops.embeddings import LocalEncoder, embed
from datasteer.ops.prepared import embedding_settings, pool_fingerprint, row_token_ids, write_prepared
from datasteer.plan import SteeringPlan
from datasteer.selectors.near import NearParams
from datasteer.selectors.tsds import TsdsParams, kernel_density, tsds_probabilities

logger = logging.getLogger(__name__)

KINDS = ("near", "tsds")


# --------------------------------------------------------------------------- index and search


def build_index(embeddings: np.ndarray, kind: str = "flat", lists: int = 0, probe: int = 8) -> Any:
    """A faiss inner-product index over ``(n, d)`` L2-normalised float32 rows."""
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, d = x.shape
    index: Any
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        nlist = min(n, lists or max(1, round(math.sqrt(n))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = min(probe, nlist)
    index.add(x)
    return index


def search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(distances, ids)`` of the ``k`` nearest rows of each query, nearest first.

    Distances are Euclidean between unit vectors, ``sqrt(2 - 2 cos)``. Where faiss found
    fewer than ``k`` rows (IVF probing few lists) the id is ``-1`` and the distance ``inf``.
    """
    sims, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, index.ntotal))
    ids = ids.astype(np.int64)
    dist = np.sqrt(np.clip(2.0 - 2.0 * sims.astype(np.float64), 0.0, None))
    dist[ids < 0] = np.inf
    order = np.argsort(dist, axis=1, kind="stable")  # faiss sorts already; padding goes last regardless
    return np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)


def tsds_from_embeddings(pool: np.ndarray, targets: np.ndarray, params: TsdsParams) -> np.ndarray:
    """TSDS probabilities ``(N,)`` from L2-normalised pool and target embeddings."""
    index = build_index(pool, params.index, params.ivf_lists, params.ivf_probe)
    dist, ids = search(index, targets, params.neighbours)
    listed = np.unique(ids[ids >= 0])
    kde_dist, _ = search(index, pool[listed], params.kde_neighbours)
    # A candidate always counts itself (IVF may miss it), so its density is at least 1.
    rho = np.maximum(kernel_density(kde_dist**2, params.sigma), 1.0)
    lookup = np.ones(len(pool))
    lookup[listed] = rho
    density = np.where(ids >= 0, lookup[np.clip(ids, 0, None)], 1.0)
    return tsds_probabilities(ids, dist, density, len(pool), alpha=params.alpha, C=params.C)


# --------------------------------------------------------------------------- embeddings


def _batches(dataset: Any, batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded ``input_ids`` / ``attention_mask`` batches of the rows, in order."""
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[j, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
            mask[j, :n] = torch.as_tensor(row.get("attention_mask") or [1] * n, dtype=torch.long)
        yield {"input_ids": ids, "attention_mask": mask}


def _embed_rows(
    dataset: Any,
    *,
    model: nn.Module | None,
    tokenizer: Any,
    encoder: LocalEncoder | None,
    layer: int,
    pooling: Any,
    batch_size: int,
    desc: str,
) -> np.ndarray:
    if encoder is not None:
        texts = tokenizer.batch_decode(row_token_ids(dataset), skip_special_tokens=True)
        out = encoder.encode(texts, desc=desc)
    else:
        assert model is not None
        pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        batches = list(_batches(dataset, batch_size, pad_id))
        out = embed(model, batches, layer=layer, pooling=pooling, normalize=False, desc=desc)
    return torch.nn.functional.normalize(out.float(), dim=1).numpy()  # the one normalisation, both paths


# --------------------------------------------------------------------------- preparation


def prepare_selection(
    kind: str,
    params: NearParams | TsdsParams,
    *,
    pool: Any,
    domains: Sequence[int] | np.ndarray,
    domain_names: Sequence[str],
    targets: Sequence[Any],
    model: nn.Module | None = None,
    tokenizer: Any = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    notes: dict[str, Any] | None = None,
) -> Path:
    """Embed, search and write the prepared file of ``kind`` for these rows; returns its JSON path.

    Args:
        kind: ``"near"`` (neighbour lists) or ``"tsds"`` (probabilities).
        params: the selector's params; ``params.prepared`` is the output directory.
        pool: the training pool (rows with ``input_ids``), in training order.
        domains: domain id of each pool row.
        domain_names: names of the domain ids.
        targets: the target (evaluation) sets, in the order the run sees them.
        model: the training model (used unless ``params.encoder`` names a local encoder).
        tokenizer: decodes rows for a local encoder; its pad id pads model batches.
        batch_size: rows per forward pass.
        device: where embeddings are computed (default: CUDA if available, else CPU).
        notes: extra facts kept in the JSON for humans (model path, dataset names, ...).
    """
    if kind not in KINDS:
        raise ConfigError(f"prepare: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not params.prepared:
        raise ConfigError(f"datasteer.params.prepared: set the directory `datasteer prepare {kind}` writes to")
    if not targets or any(len(t) == 0 for t in targets):
        raise ConfigError("eval_dataset: the targets are the evaluation rows; give the run a non-empty eval set")
    started = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    source = getattr(params, "encoder", None)
    encoder = LocalEncoder(source, device=device, batch_size=batch_size) if source else None
    if encoder is None:
        if model is None:
            raise ConfigError("prepare: no model to embed with (and no `encoder` in the params)")
        model.to(device)

    def embed_rows(dataset: Any, desc: str) -> np.ndarray:
        return _embed_rows(
            dataset,
            model=model,
            tokenizer=tokenizer,
            encoder=encoder,
            layer=params.layer,
            pooling=params.pooling,
            batch_size=batch_size,
            desc=desc,
        )

    pool_emb = embed_rows(pool, "embed pool")
    target_emb = np.concatenate([embed_rows(t, "embed targets") for t in targets])
    settings = embedding_settings(params.settings(), model)
    if kind == "near":
        _, ids = search(build_index(pool_emb), target_emb, params.neighbours)
        tensors = {"neighbours": torch.from_numpy(ids)}
        summary = {"listed": int(np.unique(ids[ids >= 0]).size)}
    else:
        assert isinstance(params, TsdsParams)
        probs = tsds_from_embeddings(pool_emb, target_emb, params)
        tensors = {"probabilities": torch.from_numpy(probs)}
        summary = {"support": int((probs > 0).sum())}
    digest = pool_fingerprint(
        pool_ids=row_token_ids(pool),
        domains=np.asarray(domains),
        domain_names=domain_names,
        target_ids=[row_token_ids(t) for t in targets],
        settings=settings,
    )
    seconds = round(time.perf_counter() - started, 3)
    info = {"pool": len(pool), "targets": len(target_emb), "seconds": seconds, **summary, **(notes or {})}
    path = write_prepared(params.prepared, kind, tensors, fingerprint=digest, settings=settings, notes=info)
    logger.info("prepare %s: wrote %s (%s)", kind, path, ", ".join(f"{k}={v}" for k, v in info.items()))
    return path


def prepare(kind: str, args: dict[str, Any], steering: SteeringPlan | None) -> Path:
    """``datasteer prepare KIND CONFIG``: load the run as ``datasteer train`` does, then prepare.

    Raises:
        ConfigError: the config does not steer with ``kind``, or LLaMA-Factory rejects it.
    """
    if kind not in KINDS:
        raise ConfigError(f"prepare: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    stage = steering.config.stages.get("select") if steering is not None else None
    if steering is None or stage is None or stage.algorithm != kind:
        raise ConfigError(f"datasteer: `datasteer prepare {kind}` needs paradigm: select and algorithm: {kind}")
    params = stage.params
    if not params.prepared:
        raise ConfigError(f"datasteer.params.prepared: set the directory `datasteer prepare {kind}` writes to")
    from datasteer.integrations import llamafactory

    model_args, data_args, training_args, finetuning_args, _ = llamafactory.validate(args, steering, training=False)
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.model import load_model, load_tokenizer

    tokenizer_module = load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    # The very loader `datasteer train` installs, so the pool rows, their order and the
    # domains are exactly those of the training run.
    domains = llamafactory._Domains()
    loader = llamafactory._per_domain_loader(get_dataset, domains)
    module = loader(template, model_args, data_args, training_args, finetuning_args.stage, **tokenizer_module)
    evals = module.get("eval_dataset")
    if evals is None:
        raise ConfigError("eval_dataset: the targets are the evaluation rows; set eval_dataset (or val_size)")
    targets = list(evals.values()) if isinstance(evals, dict) else [evals]
    model = None if getattr(params, "encoder", None) else load_model(tokenizer, model_args, finetuning_args, False)
    notes = {
        "model": str(model_args.model_name_or_path),
        "adapter": str(model_args.adapter_name_or_path),
        "dataset": list(data_args.dataset),
        "stage": finetuning_args.stage,
    }
    assert domains.ids is not None  # a selector's run is refused with streaming: true
    return prepare_selection(
        kind,
        params,
        pool=module["train_dataset"],
        domains=domains.ids,
        domain_names=domains.names,
        targets=targets,
        model=model,
        tokenizer=tokenizer,
        batch_size=steering.config.scoring_batch_size or training_args.per_device_eval_batch_size,
        notes=notes,
    )
