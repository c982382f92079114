"""Streamed domains: mix corpora that are read as streams, never held whole.

A mixture needs no random access: each step takes ``count_d`` samples of domain ``d``,
and a stream can give its next rows. :class:`StreamedDomains` puts one stream per domain
(a ``datasets.IterableDataset``: LLaMA-Factory's ``streaming: true`` data, or local
jsonl / parquet / arrow files opened with :func:`open_stream`) behind the map-style
interface the Trainer and the steering sampler already use. An index names a row by
its domain and its position in that domain's stream, ``index = position * K + domain``:

* the :class:`~datasteer.samplers.MixtureSampler` decides, per step, how many rows of each
  domain to take and hands out consecutive positions; the per-domain positions are part of
  the saved steering state, so a resume continues each stream exactly where it stopped;
* every rank computes the same global stream and trains its own micro-batches of each
  step, so the ranks train disjoint rows, and 2 processes train exactly the rows of 1;
* a stream is read forward once per process: each rank reads past the rows the other
  ranks train (a sequential read, no random access), and only the rows in flight are in
  memory. A stream that ends starts over (the next pass of that domain);
* a selector composed under the mixer chooses from a candidate window of each stream (the
  next rows, a multiple of the domain's share) instead of a pool; the rows it skips are
  read past, and a ``transform`` given here (e.g. tokenization) runs only on the rows
  asked for.

Rows are read in the stream's order (shuffle the source, e.g. ``IterableDataset.shuffle``
with a buffer, for another order): the stream is the data's order, the mixture decides
which domain each slot comes from.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasteer.errors import ConfigError

logger = logging.getLogger(__name__)

#: File suffixes :func:`open_stream` reads, and the ``datasets`` builder of each.
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
#: Bytes of a json stream read (and parsed) at a time.
_READ_BYTES = 1 << 20


def encode(domains: np.ndarray, positions: np.ndarray, num_domains: int) -> np.ndarray:
    """Stream indices of rows ``positions`` of ``domains`` (``position * K + domain``)."""
    return np.asarray(positions, dtype=np.int64) * num_domains + np.asarray(domains, dtype=np.int64)


def decode(indices: Any, num_domains: int) -> tuple[np.ndarray, np.ndarray]:
    """(domain, position) of each stream index."""
    idx = np.asarray(indices, dtype=np.int64)
    return idx % num_domains, idx // num_domains


#: A row's transform, e.g. tokenization.
Transform = Callable[[dict[str, Any]], dict[str, Any]]


def open_stream(path: str | Path, transform: Transform | None = None) -> Any:
    """A ``datasets.IterableDataset`` over a local file or a directory of files (read lazily).

    ``path``: one ``.jsonl``/``.json``/``.parquet``/``.arrow`` file, or a directory of them
    (read in sorted name order). ``transform`` (e.g. tokenization) turns each row, as it is
    read, into the row the data collator gets.
    """
    from datasets import load_dataset

    root = Path(path)
    files = sorted(p for p in root.iterdir() if p.suffix in _BUILDERS) if root.is_dir() else [root]
    if not root.exists():
        raise ConfigError(f"stream {str(path)!r}: no such file or directory")
    if not files:
        raise ConfigError(f"stream {str(path)!r}: holds no {'/'.join(_BUILDERS)} files")
    builders = {_BUILDERS.get(p.suffix, "") for p in files}
    if "" in builders or len(builders) != 1:
        raise ConfigError(f"stream {str(path)!r}: files must all be one of {', '.join(_BUILDERS)}")
    builder = builders.pop()
    # Read a bounded slice at a time: json's default reads 10 MiB per stream, parquet a row group.
    options: dict[str, Any] = {"json": {"chunksize": _READ_BYTES}, "parquet": {"batch_size": 1024}}.get(builder, {})
    stream = load_dataset(builder, data_files=[str(p) for p in files], split="train", streaming=True, **options)
    if transform is None:
        return stream
    columns = stream.column_names or list(next(iter(stream), {}))
    return stream.map(transform, remove_columns=columns)  # the transform's output replaces the row


def _pack(row: Any) -> Any:
    """A kept row, compact: each list of Python ints (token ids, labels, masks) of a dict row
    becomes an int64 array, a fifth of the memory; :func:`_unpack` gives the row back."""
    if not isinstance(row, dict):
        return row
    packed = {
        k: _Ints(v) if isinstance(v, list) and v and all(type(x) is int for x in v) else v for k, v in row.items()
    }
    return _Packed(packed)


def _unpack(kept: Any) -> Any:
    """The row :func:`_pack` kept, as it was read (a fresh dict, fresh lists)."""
    if not isinstance(kept, _Packed):
        return kept
    return {k: v.values.tolist() if isinstance(v, _Ints) else v for k, v in kept.items()}


class _Ints:
    """A list of ints, kept as an array."""

    __slots__ = ("values",)

    def __init__(self, values: list[int]) -> None:
        self.values = np.asarray(values, dtype=np.int64)


class _Packed(dict[str, Any]):
    """A dict row whose int lists are :class:`_Ints`."""


class _Cursor:
    """Reads one domain's stream forward; position ``p`` is row ``p mod length``.

    The last ``keep`` rows read are kept: a step's rows are served shuffled, so a domain's
    rows are asked for slightly out of order (and a selector's candidate windows are read
    ahead of their steps); an earlier row no longer kept restarts the stream. A
    ``transform`` (e.g. tokenization) runs when a row is first asked for, not when it is
    read: the rows other ranks train, and a candidate window's rows a selection skips, are
    read past but never transformed.
    """

    def __init__(self, name: str, source: Iterable[Any], keep: int, transform: Transform | None = None) -> None:
        self.name = name
        self.source = source
        self.keep = keep
        self.transform = transform
        self.length: int | None = None  # known once the stream has ended once
        self.restarts = 0
        self._iterator: Iterator[Any] | None = None
        self._owner = 0  # the process that opened the iterator
        self._next = 0  # stream row the iterator yields next
        self._opened_at = 0  # the row the iterator was opened at
        self._recent: OrderedDict[int, tuple[bool, Any]] = OrderedDict()  # row: (transformed, packed row)

    def __getstate__(self) -> dict[str, Any]:
        # An open stream does not pickle (a spawned data loader worker opens its own).
        return {**self.__dict__, "_iterator": None}

    def _restart(self, row: int) -> None:
        self.restarts += 1
        self._owner = os.getpid()
        skip = getattr(self.source, "skip", None)
        if row > 0 and callable(skip):
            self._iterator, self._next = iter(skip(row)), row
        else:
            self._iterator, self._next = iter(self.source), 0
        self._opened_at = self._next

    def row(self, position: int) -> Any:
        """The stream's row at ``position`` (transformed, if the cursor has a transform)."""
        row = self._read(position if self.length is None else position % self.length)
        transformed, kept = self._recent[row]
        if transformed or self.transform is None:
            return _unpack(kept)
        value = self.transform(_unpack(kept))  # once per row kept, and only for rows asked for
        self._recent[row] = (True, _pack(value))
        return value

    def _read(self, row: int) -> int:
        """Read the stream to ``row`` unless it is kept; the row's key in the kept rows (its
        position in the stream, which a stream found to end sooner wraps)."""
        if row in self._recent:
            return row
        # A forked data loader worker opens its own stream: an iterator opened by the parent
        # (e.g. to read a candidate window) shares its open files, and their read offsets.
        if self._iterator is None or row < self._next or self._owner != os.getpid():
            self._restart(row)
        assert self._iterator is not None
        while True:
            try:
                value = next(self._iterator)
            except StopIteration:
                if self._next == self._opened_at > 0:
                    # Skipped past the end of a stream of unknown length (a resume after it
                    # started over): read it from its start to learn where it ends.
                    self._restart(0)
                    continue
                if self._next == 0:
                    raise ConfigError(f"stream of domain {self.name!r} has no rows") from None
                self.length = self._next
                logger.info(
                    "datasteer: the stream of domain %r ended after %d rows; it starts over", self.name, self.length
                )
                row %= self.length
                if row in self._recent:
                    return row
                self._restart(row)
                continue
            self._recent[self._next] = (False, _pack(value))
            if len(self._recent) > self.keep:
                self._recent.popitem(last=False)
            self._next += 1
            if self._next - 1 == row:
                return row


class StreamedDomains(torch.utils.data.Dataset):
    """K domain streams as one map-style dataset, indexed by ``position * K + domain``.

    Args:
        streams: ``{domain name: iterable of rows}``, in proportion order. A
            ``datasets.IterableDataset`` is resumed with its ``skip``; any other iterable is
            read again from its start.
        length: what ``len()`` reports (the Trainer asks for one; the steering sampler, not
            this number, decides what is read). Default: a large number.
        keep: rows of each stream kept after they are read; a steered Trainer raises it to
            what its steps need at once (:meth:`hold_rows`). A row asked for after it is no
            longer kept restarts the stream.
        transform: turns a row, when it is first asked for, into the row the data collator
            gets (e.g. tokenization); rows read past are never transformed.
    """

    def __init__(
        self,
        streams: Mapping[str, Iterable[Any]],
        length: int = 2**40,
        keep: int = 1024,
        transform: Transform | None = None,
    ) -> None:
        if not streams:
            raise ConfigError("streams: name at least one domain stream")
        if keep < 1:
            raise ConfigError(f"keep: must be >= 1, got {keep}")
        self.domain_names: tuple[str, ...] = tuple(streams)
        self._cursors = [_Cursor(name, source, keep, transform) for name, source in streams.items()]
        self._length = length

    @classmethod
    def from_paths(
        cls,
        paths: Mapping[str, str | Path],
        transform: Transform | None = None,
        keep: int = 1024,
    ) -> StreamedDomains:
        """One :func:`open_stream` per domain: ``{domain name: file or directory}``, with
        ``transform`` (e.g. tokenization) applied to the rows asked for; ``keep`` as in the
        constructor."""
        streams = {name: open_stream(path) for name, path in paths.items()}
        return cls(streams, keep=keep, transform=transform)

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Any:
        position, domain = divmod(int(index), self.num_domains)  # as decode(), for one index
        return self._cursors[domain].row(position)

    def hold_rows(self, rows: int) -> None:
        """Keep at least ``rows`` rows of each stream after they are read (a steered Trainer
        asks for a step's rows, which arrive in shuffled order, and a selector's candidate windows)."""
        for cursor in self._cursors:
            cursor.keep = max(cursor.keep, rows)

    def lengths(self) -> list[int | None]:
        """Rows of each domain's stream, where it has been read to its end (else None)."""
        return [c.length for c in self._cursors]

    def restarts(self) -> list[int]:
        """How often each stream was opened (once, plus once per read of a row no longer kept)."""
        return [c.restarts for c in self._cursors]


def streamed_names(dataset: StreamedDomains, names: Sequence[str] | None) -> tuple[str, ...]:
    """The domain names of a streamed dataset (``names``, if given, must be the same)."""
    if names is not None and tuple(names) != dataset.domain_names:
        raise ConfigError(f"domain_names: {list(names)} differ from the streams' domains {list(dataset.domain_names)}")
    return dataset.domain_names
