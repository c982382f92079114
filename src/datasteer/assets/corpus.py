"""The built-in multi-domain text corpus, built locally and deterministically.

Four domains of clearly different learnability, all made on this machine with no download:

* ``prose``: English paragraphs from the Python documentation text that ships with the standard library
  (``pydoc_data.topics``), lightly cleaned and chunked at sentence and paragraph boundaries.
* ``code``: Python source from a fixed, sorted list of standard-library modules, chunked at blank lines and
  top-level ``def``/``class`` boundaries.
* ``arithmetic``: generated equations such as ``417 + 385 = 802``: fully learnable structure.
* ``noise``: uniformly random "words": nothing to learn.

Each row is ``{"text", "prompt", "response", "domain"}``; :func:`build_corpus` writes train and held-out eval
JSON-lines files per domain, a LLaMA-Factory ``dataset_info.json``, ``SOURCES.md`` and ``manifest.json``.
Every random draw comes from a ``random.Random`` seeded from the build seed and the domain name, so the same
seed gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import string
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BUILTIN_DOMAINS: tuple[str, ...] = ("prose", "code", "arithmetic", "noise")
"""Names of the built-in domains, in their canonical order."""

LEARNABLE_DOMAINS: tuple[str, ...] = ("prose", "code", "arithmetic")
"""The built-in domains with something to learn: ``noise`` is uniformly random tokens, whose
loss no model can lower below its entropy, so a mean that includes it rewards spending
steps on it."""

CORPUS_FORMAT_VERSION = 1
"""Bumped whenever the content or layout of a built corpus changes."""

CODE_MODULES: tuple[str, ...] = (
    "argparse.py",
    "base64.py",
    "bisect.py",
    "calendar.py",
    "collections/__init__.py",
    "configparser.py",
    "contextlib.py",
    "copy.py",
    "csv.py",
    "dataclasses.py",
    "datetime.py",
    "difflib.py",
    "enum.py",
    "fnmatch.py",
    "fractions.py",
    "functools.py",
    "glob.py",
    "heapq.py",
    "ipaddress.py",
    "json/decoder.py",
    "json/encoder.py",
    "pathlib.py",
    "pprint.py",
    "queue.py",
    "random.py",
    "sched.py",
    "shlex.py",
    "shutil.py",
    "statistics.py",
    "string.py",
    "tempfile.py",
    "textwrap.py",
)
"""Standard-library files (relative to ``sysconfig.get_paths()["stdlib"]``) the ``code`` domain is cut from."""

# Chunk sizes in characters. The Python documentation topics hold about 300k characters of distinct prose,
# so prose chunks are kept short (100-600 characters, median ~150) to yield the default 1500 + 100 rows with
# some margin (about 1750 chunks on Python 3.11). Code is plentiful and uses 200-600.
PROSE_MIN_CHARS = 100
PROSE_MAX_CHARS = 600
CODE_MIN_CHARS = 200
CODE_MAX_CHARS = 600
NOISE_MIN_CHARS = 200
NOISE_MAX_CHARS = 600
ARITHMETIC_MIN_EQUATIONS = 6
ARITHMETIC_MAX_EQUATIONS = 12

_MARKUP_LINE = re.compile(r"^\s*([*=\-~^#+`'\"._:])\1{2,}\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(*])")
_TOP_LEVEL_DEF = re.compile(r"^(?:@|def |async def |class )")
_NOISE_ALPHABET = string.ascii_lowercase + string.digits + ".,;:!?'-()"

Row = dict[str, str]


def _rng(seed: int, domain: str) -> random.Random:
    """A private generator seeded from the build seed and the domain name (never the global RNG)."""
    return random.Random(f"datasteer.assets.corpus:{domain}:{seed}")


def _split_long(text: str, max_chars: int) -> list[str]:
    """Split ``text`` at spaces into pieces of at most ``max_chars`` characters."""
    pieces: list[str] = []
    while len(text) > max_chars:
        cut = text.rfind(" ", 0, max_chars)
        if cut <= 0:
            cut = max_chars
        pieces.append(text[:cut])
        text = text[cut:].lstrip()
    if text:
        pieces.append(text)
    return pieces


# --------------------------------------------------------------------------------------------- prose


def _prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of one documentation topic, whitespace-collapsed, with markup and code examples dropped."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in [*text.splitlines(), ""]:
        if _MARKUP_LINE.match(line):
            continue
        if line.strip():
            current.append(line)
            continue
        if current:
            paragraph = " ".join(" ".join(current).split())
            current = []
            if ">>>" in paragraph or "::=" in paragraph:
                continue  # interactive examples and grammar rules are not prose
            wordlike = sum(c.isalpha() or c == " " for c in paragraph)
            if wordlike < 0.7 * len(paragraph):
                continue  # mostly code or symbols
            paragraphs.append(paragraph)
    return paragraphs


def prose_chunks() -> list[str]:
    """All distinct prose chunks, in a fixed order, from ``pydoc_data.topics``.

    Returns:
        Chunks of 100-600 characters made of whole sentences; paragraphs inside a chunk are separated by a
        blank line. Paragraphs repeated across topics are kept once, so no two chunks share text.
    """
    from pydoc_data.topics import topics

    seen: set[str] = set()
    chunks: list[str] = []
    for key in sorted(topics):
        current = ""
        for paragraph in _prose_paragraphs(topics[key]):
            if paragraph in seen:
                continue
            seen.add(paragraph)
            sentences = [
                piece for sentence in _SENTENCE_END.split(paragraph) for piece in _split_long(sentence, PROSE_MAX_CHARS)
            ]
            for i, sentence in enumerate(sentences):
                sep = "\n\n" if i == 0 else " "
                if current and len(current) + len(sep) + len(sentence) > PROSE_MAX_CHARS:
                    if len(current) >= PROSE_MIN_CHARS:
                        chunks.append(current)
                    current = sentence
                else:
                    current = current + sep + sentence if current else sentence
                if len(current) >= PROSE_MIN_CHARS:
                    chunks.append(current)
                    current = ""
        if len(current) >= PROSE_MIN_CHARS:
            chunks.append(current)
    return list(dict.fromkeys(chunks))


# ---------------------------------------------------------------------------------------------- code


def _code_blocks(source: str) -> Iterator[str]:
    """Blank-line separated blocks of a source file, each at most ``CODE_MAX_CHARS`` long."""
    lines = [line.rstrip() for line in source.splitlines()]
    block: list[str] = []
    for line in [*lines, ""]:
        if line:
            block.append(line)
            continue
        if not block:
            continue
        piece: list[str] = []
        size = 0
        for block_line in block:
            for part in _split_long(block_line, CODE_MAX_CHARS):
                if piece and size + 1 + len(part) > CODE_MAX_CHARS:
                    yield "\n".join(piece)
                    piece, size = [], 0
                piece.append(part)
                size += len(part) + (1 if size else 0)
        if piece:
            yield "\n".join(piece)
        block = []


def code_chunks() -> list[str]:
    """All distinct code chunks, in a fixed order, from the standard-library files in :data:`CODE_MODULES`.

    Returns:
        Chunks of 200-600 characters made of whole blank-line separated blocks; a new chunk starts at a
        top-level ``def``/``class``/decorator once the current one is long enough.

    Raises:
        FileNotFoundError: If one of the standard-library files is missing from this Python installation.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks: list[str] = []
    for rel in CODE_MODULES:
        path = stdlib / rel
        if not path.is_file():
            raise FileNotFoundError(f"code domain: standard-library file {path} not found")
        current = ""
        for block in _code_blocks(path.read_text(encoding="utf-8")):
            too_long = current and len(current) + 2 + len(block) > CODE_MAX_CHARS
            boundary = len(current) >= CODE_MIN_CHARS and _TOP_LEVEL_DEF.match(block) is not None
            if too_long or boundary:
                if len(current) >= CODE_MIN_CHARS:
                    chunks.append(current)
                current = block
            else:
                current = current + "\n\n" + block if current else block
        if len(current) >= CODE_MIN_CHARS:
            chunks.append(current)
    return list(dict.fromkeys(chunks))


# ------------------------------------------------------------------------------------- split helpers


def _split_near_middle(text: str, separators: Sequence[str]) -> tuple[str, str]:
    """Split ``text`` into (prompt, response) at the separator occurrence closest to its middle.

    The separators are tried in order and count only when the cut lies in the middle half of the text;
    the last one may cut anywhere. Falls back to the middle character. The prompt loses trailing
    whitespace; the response keeps its leading indentation. Neither part is empty.
    """
    middle = len(text) // 2
    for i, sep in enumerate(separators):
        lo, hi = (0, len(text)) if i == len(separators) - 1 else (len(text) // 4, 3 * len(text) // 4)
        best: tuple[str, str] | None = None
        best_distance = len(text) + 1
        start = text.find(sep)
        while start != -1:
            cut = start + len(sep)
            head, tail = text[:cut].rstrip(), text[cut:]
            distance = abs(cut - middle)
            if lo <= cut <= hi and head.strip() and tail.strip() and distance < best_distance:
                best, best_distance = (head, tail), distance
            start = text.find(sep, start + 1)
        if best is not None:
            return best
    cut = max(1, len(text) // 2)
    return text[:cut], text[cut:]


def _row(domain: str, text: str, prompt: str, response: str) -> Row:
    if not prompt or not response:
        raise AssertionError(f"{domain}: empty prompt or response for {text!r}")
    return {"text": text, "prompt": prompt, "response": response, "domain": domain}


def _source_rows(domain: str, chunks: list[str], need: int, seed: int) -> list[Row]:
    """Shuffle source chunks with the domain's generator and keep ``need`` of them as rows."""
    if len(chunks) < need:
        raise ValueError(
            f"domain {domain!r}: its source yields only {len(chunks)} distinct chunks, but {need} were "
            f"requested (train_per_domain + eval_per_domain); ask for at most {len(chunks)} in total"
        )
    order = list(chunks)
    _rng(seed, domain).shuffle(order)
    separators = ["\n\n", ". ", " "] if domain == "prose" else ["\n", " "]
    rows = []
    for text in order[:need]:
        prompt, response = _split_near_middle(text, separators)
        rows.append(_row(domain, text, prompt, response))
    return rows


# --------------------------------------------------------------------------------- generated domains


def _arithmetic_rows(need: int, seed: int) -> list[Row]:
    """Generate ``need`` distinct arithmetic samples (several equations each)."""
    rng = _rng(seed, "arithmetic")
    rows: list[Row] = []
    seen: set[str] = set()
    while len(rows) < need:
        problems: list[str] = []
        equations: list[str] = []
        for _ in range(rng.randint(ARITHMETIC_MIN_EQUATIONS, ARITHMETIC_MAX_EQUATIONS)):
            op = rng.choice("+-*")
            if op == "+":
                a, b = rng.randint(0, 999), rng.randint(0, 999)
                result = a + b
            elif op == "-":
                a = rng.randint(0, 999)
                b = rng.randint(0, a)
                result = a - b
            else:
                a, b = rng.randint(0, 99), rng.randint(0, 99)
                result = a * b
            problems.append(f"{a} {op} {b}")
            equations.append(f"{a} {op} {b} = {result}")
        text = "\n".join(equations)
        if text in seen:
            continue
        seen.add(text)
        prompt = "Compute " + ", ".join(problems[:-1]) + " and " + problems[-1] + "."
        rows.append(_row("arithmetic", text, prompt, text))
    return rows


def _noise_rows(need: int, seed: int) -> list[Row]:
    """Generate ``need`` distinct samples of uniformly random "words"."""
    rng = _rng(seed, "noise")
    rows: list[Row] = []
    seen: set[str] = set()
    while len(rows) < need:
        target = rng.randint(NOISE_MIN_CHARS, NOISE_MAX_CHARS)
        words: list[str] = []
        size = -1
        while size < target:
            word = "".join(rng.choice(_NOISE_ALPHABET) for _ in range(rng.randint(1, 8)))
            words.append(word)
            size += len(word) + 1
        text = " ".join(words)
        if text in seen:
            continue
        seen.add(text)
        prompt, response = _split_near_middle(text, [" "])
        rows.append(_row("noise", text, prompt, response))
    return rows


def domain_rows(domain: str, need: int, *, seed: int = 0) -> list[Row]:
    """Make ``need`` distinct rows of one built-in domain.

    Args:
        domain: One of :data:`BUILTIN_DOMAINS`.
        need: Number of rows.
        seed: Build seed; the domain's generator is seeded from it and the domain name.

    Returns:
        Rows ``{"text", "prompt", "response", "domain"}`` in a seed-dependent order.

    Raises:
        ValueError: If ``domain`` is unknown, or its source yields fewer than ``need`` distinct chunks.
    """
    if domain == "prose":
        return _source_rows(domain, prose_chunks(), need, seed)
    if domain == "code":
        return _source_rows(domain, code_chunks(), need, seed)
    if domain == "arithmetic":
        return _arithmetic_rows(need, seed)
    if domain == "noise":
        return _noise_rows(need, seed)
    raise ValueError(f"unknown domain {domain!r}; known: {', '.join(BUILTIN_DOMAINS)}")


# ------------------------------------------------------------------------------------------- writing


def _jsonl(rows: list[Row]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def _dataset_info() -> dict[str, Any]:
    info: dict[str, Any] = {}
    for domain in BUILTIN_DOMAINS:
        for suffix, file_name in (("", f"{domain}.jsonl"), ("_eval", f"{domain}_eval.jsonl")):
            info[f"{domain}{suffix}"] = {"file_name": file_name, "columns": {"prompt": "text"}}
            info[f"{domain}_sft{suffix}"] = {
                "file_name": file_name,
                "columns": {"prompt": "prompt", "response": "response"},
            }
    return info


def _sources_md() -> str:
    version = ".".join(map(str, sys.version_info[:3]))
    modules = ", ".join(f"`{m}`" for m in CODE_MODULES)
    return f"""# Sources of the datasteer built-in corpus

Built locally by `datasteer.assets.corpus.build_corpus` with Python {version}; nothing is downloaded.
Rows are JSON objects with `text`, `prompt`, `response` and `domain`. `<domain>.jsonl` is the training
split and `<domain>_eval.jsonl` a disjoint held-out split. `dataset_info.json` registers, per domain `d`,
a pre-training view `d` (column `text`) and an alpaca SFT view `d_sft` (`prompt` -> `response`), and the
same for the eval files (`d_eval`, `d_sft_eval`).

## prose

English text from the Python documentation topics shipped with the standard library
(`pydoc_data.topics`, the text behind `help()`), lightly cleaned (heading underlines, interactive examples,
grammar rules and symbol-heavy paragraphs dropped, whitespace collapsed) and cut into chunks of
{PROSE_MIN_CHARS}-{PROSE_MAX_CHARS} characters at sentence boundaries.
Copyright Python Software Foundation; licence: PSF License Agreement
(https://docs.python.org/3/license.html).

## code

Python source from these standard-library files of the same Python installation: {modules}. Cut at
blank lines and top-level `def`/`class` boundaries into chunks of {CODE_MIN_CHARS}-{CODE_MAX_CHARS}
characters. Copyright Python Software Foundation; licence: PSF License Agreement
(https://docs.python.org/3/license.html).

## arithmetic

Generated by datasteer: {ARITHMETIC_MIN_EQUATIONS}-{ARITHMETIC_MAX_EQUATIONS} equations per row such as
`417 + 385 = 802` (addition and subtraction of numbers below 1000, multiplication of numbers below 100).
The SFT prompt lists the problems (`Compute 417 + 385 and 12 * 34.`); the response is the equations.
No third-party content; covered by the datasteer licence (Apache-2.0).

## noise

Generated by datasteer: random "words" of 1-8 characters drawn uniformly from lowercase letters, digits
and punctuation. Nothing in it is learnable. No third-party content; covered by the datasteer licence
(Apache-2.0).
"""


def build_corpus(
    out_dir: Path,
    *,
    seed: int = 0,
    train_per_domain: int = 1500,
    eval_per_domain: int = 100,
) -> Path:
    """Build the built-in corpus into ``out_dir``.

    Writes ``<domain>.jsonl`` (train), ``<domain>_eval.jsonl`` (held out, disjoint from train) for every
    domain in :data:`BUILTIN_DOMAINS`, plus ``dataset_info.json`` (LLaMA-Factory), ``SOURCES.md`` and,
    last, ``manifest.json`` (build settings, row counts and the sha256 of every file). The same ``seed``
    gives byte-identical files on the same Python version.

    Args:
        out_dir: Directory to write into; created if missing. Existing files of the same names are
            overwritten.
        seed: Seed of every random draw (combined with each domain's name).
        train_per_domain: Training rows per domain.
        eval_per_domain: Held-out rows per domain.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: If a count is negative or zero, or a domain's source cannot give
            ``train_per_domain + eval_per_domain`` distinct rows; nothing is written in that case.
    """
    if train_per_domain < 1 or eval_per_domain < 1:
        raise ValueError(
            f"train_per_domain and eval_per_domain must be >= 1, got {train_per_domain} and {eval_per_domain}"
        )
    need = train_per_domain + eval_per_domain
    splits: dict[str, tuple[list[Row], list[Row]]] = {}
    for domain in BUILTIN_DOMAINS:
        rows = domain_rows(domain, need, seed=seed)
        splits[domain] = (rows[eval_per_domain:], rows[:eval_per_domain])

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, Any]] = {}

    def write(name: str, data: bytes, rows: int | None = None) -> None:
        (out_dir / name).write_bytes(data)
        entry: dict[str, Any] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        if rows is not None:
            entry["rows"] = rows
        files[name] = entry

    for domain, (train, held_out) in splits.items():
        write(f"{domain}.jsonl", _jsonl(train), len(train))
        write(f"{domain}_eval.jsonl", _jsonl(held_out), len(held_out))
    write("dataset_info.json", (json.dumps(_dataset_info(), indent=2) + "\n").encode("utf-8"))
    write("SOURCES.md", _sources_md().encode("utf-8"))

    manifest = {
        "asset": "corpus",
        "format_version": CORPUS_FORMAT_VERSION,
        "python_version": ".".join(map(str, sys.version_info[:3])),
        "settings": {"seed": seed, "train_per_domain": train_per_domain, "eval_per_domain": eval_per_domain},
        "domains": list(BUILTIN_DOMAINS),
        "files": files,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "built corpus in %s: %d domains x (%d train + %d eval) rows, seed %d",
        out_dir,
        len(BUILTIN_DOMAINS),
        train_per_domain,
        eval_per_domain,
        seed,
    )
    return out_dir
