"""Steering for the Hugging Face ``Trainer`` (and subclasses such as TRL's ``SFTTrainer``).

    class SteeringTrainer(SteeringMixin, Trainer): ...
    trainer = SteeringTrainer(model=..., args=..., train_dataset=ds, data_collator=...,
                              steering={"paradigm": "mix", "algorithm": "static"})

The mixin overrides only ``_get_train_sampler`` (to serve the steering stream) and
``compute_loss`` (to apply per-sample weights from the same forward pass), wraps
``train`` to note the checkpoint a run resumes from, and adds a :class:`SteeringCallback`
for updates, logging and checkpoints. The training loop itself is the Trainer's own.

Loss normalisation when weighting: each micro-batch returns ``sum_i w_i l_i / b`` where
``l_i`` is sample i's token-mean loss and ``b`` the micro-batch size, divided by the
number of accumulation micro-batches (here or by the Trainer, whichever the Trainer's
``num_items_in_batch`` logic says), and DDP averages over ranks; the step's gradient is
that of ``(1/B) sum_i w_i l_i`` over the global batch, so 1x4 and 4x1 accumulation agree.
Without weighting the Trainer's own loss (token mean over the step) is used unchanged.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from datasteer import atomic, dist
from datasteer.config import SteeringConfig
from datasteer.controller import SteeringController
from datasteer.errors import ConfigError, SteeringStateError, TrainingDivergedError
from datasteer.integrations.checkpoint import STATE_FILE, latest_complete, load_state, save_state
from datasteer.ops import INDEX_KEY, ModelOps, per_token_loss
from datasteer.ops.embeddings import pool
from datasteer.ops.losses import token_mean
from datasteer.ops.reference import load_reference_model, reference_losses
from datasteer.plan import SteeringPlan, build_plan
from datasteer.runlog import RunLog
from datasteer.streams import StreamedDomains, streamed_names

logger = logging.getLogger(__name__)

__all__ = ["STATE_FILE", "IndexCollator", "SteeringCallback", "SteeringMixin"]

#: Dataset column read as the domain of each training row (when no ``domains`` are given).
DOMAIN_COLUMN = "domain"
#: File in ``output_dir`` holding the proportions a mixer learned (DoReMi step 2's output).
WEIGHTS_FILE = "domain_weights.json"


class IndexCollator:
    """Moves each row's pool index out of the features into ``batch[INDEX_KEY]``.

    Wraps the run's own collator, which never sees the index.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, features: list[Any]) -> Any:
        if not features or not isinstance(features[0], Mapping) or INDEX_KEY not in features[0]:
            return self.inner(features)
        rows = [dict(f) for f in features]
        indices = torch.tensor([row.pop(INDEX_KEY) for row in rows], dtype=torch.long)
        batch = self.inner(rows)
        batch[INDEX_KEY] = indices
        return batch


class _IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset whose rows (dicts) also carry their index."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.base[i]
        if not isinstance(row, Mapping):
            raise TypeError("steering needs dataset rows that are dicts")
        return {**row, INDEX_KEY: i}


def resolve_domains(
    dataset: Any, domains: Sequence[Any] | np.ndarray | None, domain_names: Sequence[str] | None
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Domain id of each training row and the domain names.

    From ``domains`` (one label per row: ints with ``domain_names``, or names), else from
    the dataset's ``domain`` column, else one domain named ``all``.
    """
    if domains is None and DOMAIN_COLUMN in (getattr(dataset, "column_names", None) or []):
        domains = list(dataset[DOMAIN_COLUMN])
    if domains is None:
        return np.zeros(len(dataset), dtype=np.int64), tuple(domain_names or ("all",))
    labels = list(domains)
    if len(labels) != len(dataset):
        raise ConfigError(f"domains: {len(labels)} labels for a training set of {len(dataset)} rows")
    if all(isinstance(v, int | np.integer) for v in labels) and domain_names is not None:
        ids = np.asarray(labels, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= len(domain_names):
            raise ConfigError(f"domains: ids must lie in [0, {len(domain_names)})")
        return ids, tuple(domain_names)
    names = list(domain_names) if domain_names is not None else list(dict.fromkeys(str(v) for v in labels))
    lookup = {n: i for i, n in enumerate(names)}
    missing = sorted({str(v) for v in labels} - set(lookup))
    if missing:
        raise ConfigError(f"domains: labels {missing} are not in domain_names {names}")
    return np.asarray([lookup[str(v)] for v in labels], dtype=np.int64), tuple(names)


def auto_lag(num_workers: int, prefetch_factor: int | None, grad_accum: int) -> int:
    """Steps of look-ahead the data loader may have drawn when a step ends.

    Accelerate prefetches one micro-batch; worker processes prefetch
    ``num_workers * prefetch_factor`` more.
    """
    ahead = 1 + (num_workers * (prefetch_factor or 2) if num_workers > 0 else 0)
    return max(1, math.ceil(ahead / grad_accum))


#: The ``transformers`` releases whose loss normalisation :func:`trainer_divides_loss` mirrors
#: (``Trainer.training_step``); ``pyproject.toml`` bounds the dependency to the same range.
TESTED_TRANSFORMERS = ((5, 0), (5, 7))


def trainer_divides_loss(trainer: Any, num_items_in_batch: Any) -> bool:
    """Whether ``Trainer.training_step`` divides ``compute_loss``'s result by the number of
    accumulation micro-batches (otherwise the loss must come back already divided).

    This mirrors the rule of ``transformers`` 5.0-5.6's ``training_step``: it divides unless
    the model accepts loss kwargs and ``num_items_in_batch`` is known, or a
    ``compute_loss_func`` is set. Another release is refused: the rule may have changed.
    """
    import transformers

    version = tuple(int(v) for v in transformers.__version__.split(".")[:2])
    low, high = TESTED_TRANSFORMERS
    if not low <= version < high:
        raise SteeringStateError(
            f"transformers {transformers.__version__}: datasteer's weighted loss is tested with "
            f"{low[0]}.{low[1]} <= transformers < {high[0]}.{high[1]}"
        )
    return bool(
        (not trainer.model_accepts_loss_kwargs or num_items_in_batch is None) and trainer.compute_loss_func is None
    )


class SteeringMixin:
    """Adds data steering to a ``transformers.Trainer`` subclass (put it first in the bases).

    Args (keyword, besides the Trainer's own):
        steering: the ``datasteer:`` block (a mapping, a parsed :class:`SteeringConfig`, or a
            built :class:`SteeringPlan`, whose algorithms are then used as they are);
            ``None`` leaves the Trainer unchanged.
        domains: one domain label per training row (default: the ``domain`` column). A
            :class:`~datasteer.streams.StreamedDomains` training set names its own domains.
        domain_names: the domain names, in proportion order (default: order of appearance).
    """

    steering: SteeringController | None

    def __init__(
        self,
        *args: Any,
        steering: SteeringPlan | SteeringConfig | Mapping[str, Any] | None = None,
        domains: Sequence[Any] | np.ndarray | None = None,
        domain_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        # Domains are read before the Trainer (e.g. TRL's) processes the dataset, which may
        # drop the domain column; the row count must survive that processing.
        raw = kwargs.get("train_dataset")
        streamed = isinstance(raw, StreamedDomains)
        resolved: tuple[np.ndarray | None, tuple[str, ...]]
        if isinstance(raw, StreamedDomains):
            if domains is not None:
                raise ConfigError("domains: streamed domains name their own domains; drop domains=")
            resolved = (None, streamed_names(raw, domain_names))
        elif steering is not None and raw is not None and hasattr(raw, "__len__"):
            resolved = resolve_domains(raw, domains, domain_names)
        plan = None if steering is None else steering if isinstance(steering, SteeringPlan) else build_plan(steering)
        super().__init__(*args, **kwargs)
        self.steering = None
        self._steering_resume: str | None = None
        self._steering_resume_state: dict[str, Any] | None = None
        # Whether a micro-batch of the current optimizer step had a non-finite loss (a device
        # tensor, read once per step), and the error a diverged run ends with.
        self._steering_loss_bad: torch.Tensor | None = None
        self._steering_diverged: TrainingDivergedError | None = None
        self._steering_reference: torch.nn.Module | None = None
        # (name, rows, collator) of each target (evaluation) set, read from the Trainer's own
        # evaluation loaders once: asking for a loader at every update would make accelerate
        # prepare (and keep) one more each time.
        self._steering_targets: list[tuple[str | None, Any, Any]] | None = None
        self.steering_plan = plan
        if plan is None:
            return
        trainer: Any = self
        args_ = trainer.args
        dataset = trainer.train_dataset
        if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise ConfigError("datasteer: steering needs a map-style training dataset with a length")
        if raw is None:
            resolved = resolve_domains(dataset, domains, domain_names)
        if resolved[0] is not None and len(resolved[0]) != len(dataset):
            raise ConfigError(
                f"domains: the trainer turned {len(resolved[0])} training rows into {len(dataset)} "
                "(packing?); disable it or pass one domain label per processed row as domains="
            )
        if getattr(args_, "train_sampling_strategy", "random") == "group_by_length" or getattr(
            args_, "group_by_length", False
        ):
            raise ConfigError(
                "group_by_length: cannot be combined with datasteer (the steering sampler orders the data)"
            )
        if args_.ignore_data_skip:
            raise ConfigError("ignore_data_skip: datasteer resumes exactly; set ignore_data_skip: false")
        config = plan.config
        global_batch = trainer._train_batch_size * args_.gradient_accumulation_steps * args_.world_size
        lag = config.lag or auto_lag(
            args_.dataloader_num_workers, args_.dataloader_prefetch_factor, args_.gradient_accumulation_steps
        )
        log = RunLog(Path(args_.output_dir) / config.log_file, enabled=trainer.is_world_process_zero())
        # Domain-dependent params are checked here (e.g. proportions of the wrong length), not at train().
        self.steering = SteeringController(
            plan,
            domains=resolved[0],
            domain_names=resolved[1],
            global_batch=global_batch,
            seed=config.seed if config.seed is not None else args_.seed,
            lag=lag,
            log=log,
            stream_steps=args_.max_steps if streamed else None,
        )
        if isinstance(raw, StreamedDomains):
            raw.hold_rows(self.steering.stream_rows)
        if self.steering.needs_sample_losses and getattr(args_, "use_liger_kernel", False):
            raise ConfigError(
                f"use_liger_kernel: its fused loss returns no logits, and {config.describe()} needs per-sample "
                "losses from them; turn it off"
            )
        if self.steering.weights_samples and trainer.compute_loss_func is not None:
            raise ConfigError(
                f"compute_loss_func: {config.describe()} weights each sample's loss and needs per-sample "
                "losses; a custom loss function cannot provide them (remove it or the weighting stage)"
            )
        plan.prepare_model(trainer.model)
        reference = plan.reference_model()
        self._steering_reference = load_reference_model(reference, trainer.model) if reference else None
        if hasattr(dataset, "column_names") and hasattr(dataset, "add_column"):
            if DOMAIN_COLUMN in dataset.column_names:
                dataset = dataset.remove_columns(DOMAIN_COLUMN)
            trainer.train_dataset = dataset.add_column(INDEX_KEY, np.arange(len(dataset)))
        else:
            trainer.train_dataset = _IndexedDataset(dataset)
        trainer.data_collator = IndexCollator(trainer.data_collator)
        trainer._set_signature_columns_if_needed()
        if INDEX_KEY not in trainer._signature_columns:
            trainer._signature_columns.append(INDEX_KEY)
        # First in line: its on_log adds the steering numbers to the logs before the reporting
        # callbacks (TensorBoard, W&B, ...) see them.
        trainer.callback_handler.callbacks.insert(0, SteeringCallback(self))

    # -- overrides --------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's ``train``; notes which checkpoint's steering state to restore."""
        trainer: Any = self
        if resume_from_checkpoint is True:
            self._steering_resume = get_last_checkpoint(trainer.args.output_dir)
        elif isinstance(resume_from_checkpoint, str | os.PathLike):
            self._steering_resume = str(resume_from_checkpoint)
        else:
            self._steering_resume = None
        self._steering_resume_state = None
        if self.steering is not None and self._steering_resume is not None:
            # Checked before the Trainer loads anything: a checkpoint cut short by a kill is
            # refused with the name of the latest complete one.
            self._steering_resume_state = load_state(self._steering_resume)
        self._steering_diverged = None
        result = super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]
        if self._steering_diverged is not None:
            raise self._steering_diverged
        return result

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        base = super()._get_train_sampler(train_dataset)  # type: ignore[misc]
        if self.steering is None or self.steering.sampler is None:
            return base
        return self.steering.sampler

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        trainer: Any = self
        indices = inputs.pop(INDEX_KEY, None)
        ctl = self.steering
        if ctl is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # type: ignore[misc]
        if indices is None or not ctl.needs_sample_losses:
            if indices is not None:
                ctl.observe(indices)
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # type: ignore[misc]
            self._steering_watch(result[0] if isinstance(result, tuple) else result)
            return result
        labels = inputs.get("labels")
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        wanted = ctl.embedding_layer
        if wanted is not None:  # hidden states of this same forward, pooled below: no second pass
            inputs = {**inputs, "output_hidden_states": True}
        # The Trainer's own forward and loss (its label smoothing, loss kwargs, subclass logic).
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)  # type: ignore[misc]
        logits = getattr(outputs, "logits", None)
        if labels is None or logits is None:
            raise SteeringStateError(
                f"{ctl.plan.config.describe()} needs per-sample losses: the batch must have labels and the "
                "model must return logits (fused-loss kernels that drop them are not supported)"
            )
        weighting = ctl.weights_samples
        smoothing = float(trainer.args.label_smoothing_factor) if trainer.label_smoother is not None else 0.0
        token_losses, mask = per_token_loss(logits if weighting else logits.detach(), labels, smoothing)
        losses, counts = token_mean(token_losses, mask)
        excess = ref_mean = embeddings = None
        if self._steering_reference is not None and ctl.reference_model is not None:  # a mixer's or weighter's
            excess, ref_mean = reference_losses(self._steering_reference, model_inputs, labels, token_losses, smoothing)
        if wanted is not None:
            hidden = getattr(outputs, "hidden_states", None)
            if hidden is None:
                raise SteeringStateError(f"{ctl.plan.config.describe()} needs hidden states; the model returned none")
            attention = model_inputs.get("attention_mask")
            if attention is None:
                attention = torch.ones(hidden[wanted[0]].shape[:2], dtype=torch.long)
            embeddings = pool(hidden[wanted[0]].detach(), attention, wanted[1])
        batch = ctl.observe(indices, losses.detach(), counts, excess, ref_mean, embeddings)
        if weighting:
            weights = ctl.sample_weights(trainer.state.global_step + 1, batch)
            # A left-out sample (weight 0, e.g. a NaN loss) must not turn the sum NaN: 0 * NaN is NaN.
            kept = torch.where(weights > 0, losses, torch.zeros_like(losses))
            loss = (weights * kept).sum() / losses.numel()
            if not trainer_divides_loss(trainer, num_items_in_batch):
                loss = loss / trainer.current_gradient_accumulation_steps
        self._steering_watch(loss)
        return (loss, outputs) if return_outputs else loss

    def _steering_watch(self, loss: torch.Tensor) -> None:
        """Note whether this micro-batch's training loss is finite (no device sync here)."""
        bad = ~torch.isfinite(loss.detach()).all()
        self._steering_loss_bad = bad if self._steering_loss_bad is None else self._steering_loss_bad | bad

    # -- used by the callback ---------------------------------------------------------------
    def _steering_ops(self, dataloader: Any, optimizer: Any = None) -> ModelOps:
        trainer: Any = self
        plan = self.steering_plan
        size = (plan.config.scoring_batch_size if plan else None) or trainer.args.per_device_eval_batch_size
        device = trainer.args.device
        if self._steering_targets is None:
            evals = trainer.eval_dataset
            names = list(evals) if isinstance(evals, Mapping) else ([None] if evals is not None else [])
            # The Trainer's own evaluation loaders give each target set its columns and collator.
            loaders = [trainer.get_eval_dataloader(name) for name in names]
            self._steering_targets = [(n, ld.dataset, ld.collate_fn) for n, ld in zip(names, loaders, strict=True)]
        targets = [
            ModelOps(trainer.model, rows, collate, size, device, name=name, memoize=True)
            for name, rows, collate in self._steering_targets
        ]
        # Pool features are written under the output directory (a system /tmp may be small or in memory).
        scratch = trainer.args.output_dir
        return ModelOps(
            trainer.model,
            dataloader.dataset,
            dataloader.collate_fn,
            size,
            device,
            targets,
            optimizer,
            scratch_dir=scratch,
            reference=self._steering_reference,
        )


class SteeringCallback(TrainerCallback):
    """Runs the controller at train begin and step end; saves/restores its state."""

    def __init__(self, trainer: SteeringMixin) -> None:
        self.trainer = trainer
        self._pending: dict[str, float] = {}
        self._nonfinite_steps = 0  # consecutive optimizer steps with a non-finite training loss

    def _ops(self, kwargs: dict[str, Any]) -> Any:
        loader = kwargs.get("train_dataloader")
        optimizer = kwargs.get("optimizer")
        return (lambda: self.trainer._steering_ops(loader, optimizer)) if loader is not None else None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        ctl = self.trainer.steering
        if ctl is None:
            return
        path = self.trainer._steering_resume
        if path is not None:
            saved = self.trainer._steering_resume_state
            ctl.load_state_dict(saved if saved is not None else load_state(path))
            if ctl._resumed_at != state.global_step:
                raise SteeringStateError(
                    f"{Path(path) / STATE_FILE} is for step {ctl._resumed_at}, the Trainer resumed at step "
                    f"{state.global_step}"
                )
        self._nonfinite_steps = 0
        self._publish(ctl.begin(state.max_steps, self._ops(kwargs)), args, state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        ctl = self.trainer.steering
        if ctl is not None:
            self._publish(ctl.step_end(state.global_step, self._ops(kwargs)), args, state)
            self._check_divergence(ctl, args, state, control)

    def _check_divergence(self, ctl: SteeringController, args: Any, state: Any, control: Any) -> None:
        """Stop the run once the training loss was non-finite for ``max_nonfinite_steps`` steps
        in a row (the same decision on every rank); :meth:`SteeringMixin.train` then raises."""
        limit = ctl.plan.config.max_nonfinite_steps
        bad = self.trainer._steering_loss_bad
        self.trainer._steering_loss_bad = None
        if limit == 0:
            return
        flag = torch.tensor(float(bad.item()) if bad is not None else 0.0)
        if dist.all_reduce(flag, "max").item() > 0:
            self._nonfinite_steps += 1
        else:
            self._nonfinite_steps = 0
        if self._nonfinite_steps < limit:
            return
        step = state.global_step
        first = step - self._nonfinite_steps + 1
        control.should_training_stop = True
        saved = Path(args.output_dir) / STATE_FILE
        if args.should_save:  # what the steering had learned when the run stopped, for inspection
            save_state(ctl.state_dict(step), args.output_dir)
        previous = latest_complete(args.output_dir, before=first)
        back = f"; the latest complete checkpoint before it is {previous}" if previous else ""
        self.trainer._steering_diverged = TrainingDivergedError(
            f"training diverged: the loss was NaN or infinite for {self._nonfinite_steps} consecutive steps "
            f"({first}-{step}); stopped at step {step}, steering state saved to {saved}{back} (lower the "
            "learning rate, or set datasteer.max_nonfinite_steps: 0 to train on)"
        )
        logger.error("%s", self.trainer._steering_diverged)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        ctl = self.trainer.steering
        if ctl is not None:
            ctl.end(state.global_step)
        learned = ctl.learned_proportions() if ctl is not None else None
        if learned is None or not args.should_save:
            return
        if self.trainer._steering_diverged is not None:
            logger.warning("steering: the run diverged; the learned proportions are not written")
            return
        learned["step"] = state.global_step
        path = Path(args.output_dir) / WEIGHTS_FILE
        atomic.write_text(path, json.dumps(learned, indent=2) + "\n")
        logger.info("steering: learned proportions %s written to %s", learned["proportions"], path)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        ctl = self.trainer.steering
        if ctl is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        payload = ctl.state_dict(state.global_step)
        if args.should_save and folder.is_dir():
            save_state(
                payload, folder
            )  # atomically, after the Trainer's files: its presence marks a complete checkpoint

    def _publish(self, events: list[dict[str, Any]], args: Any, state: Any) -> None:
        """Keep each event's numbers for the Trainer's logs (see :meth:`on_log`).

        Not logged here: a ``log`` call inside ``on_step_end`` would make the Trainer skip its
        own loss / learning-rate log of that step.
        """
        for event in events:
            prefix = f"steering/{event['paradigm']}"
            self._pending[f"{prefix}_seconds"] = float(event["seconds"])
            if "nonfinite" in event:  # one count per stage: the stages would overwrite each other
                self._pending[f"{prefix}_nonfinite"] = float(event["nonfinite"])
            for key, value in event.items():
                if key in (
                    "step",
                    "paradigm",
                    "algorithm",
                    "served",
                    "seconds",
                    "nonfinite",
                    "digest",
                    "update",
                    "first_step",
                    "last_step",
                ):
                    continue
                if isinstance(value, dict):  # per-domain numbers: proportions, statistics, quotas
                    name = "p" if key == "proportions" else key
                    self._pending.update({f"steering/{name}_{k}": float(v) for k, v in value.items()})
                elif isinstance(value, int | float) and not isinstance(value, bool):
                    self._pending[f"steering/{key}"] = float(value)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Add the latest steering numbers to the Trainer's own training log (its loggers and
        ``state.log_history``): every log line carries the newest decision of each stage."""
        if logs is None or not self._pending or not any(k in logs for k in ("loss", "train_loss")):
            return
        logs.update(self._pending)
        if state.log_history:
            state.log_history[-1].update(self._pending)
