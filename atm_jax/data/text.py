"""Tokenization for the paper's NLP setup and a local TSV text source.

The NLP experiments of ATM (arXiv 2411.03055, Sec. 5) finetune BERT-base-uncased
and RoBERTa-base on seven GLUE tasks with inputs truncated and padded to 128
tokens. Here a batch of sentences (or sentence pairs) becomes one int32 array
[N, 3, max_length] stacking (input_ids, attention_mask, token_type_ids), the
layout `atm_jax.data.paper` hands to the models.

Tokenizers come from a local Hugging Face folder or hub id (`load_tokenizer`) or
are plain `tokenizers.Tokenizer` objects read from a ``tokenizer.json``.

Local TSV tasks (for tiny runs without GLUE) are laid out as::

  <root>/<task>/train.tsv     header "text<TAB>label" or "text<TAB>text_b<TAB>label"
  <root>/<task>/test.tsv      same columns
  <root>/<task>/labels.txt    optional: class names, one per line, label i on line i

Labels are integers 0..C-1. Fields are tab-separated and unquoted (a field may not
contain a tab or a newline).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from atm_jax import files
from atm_jax.errors import TokenizerUnavailableError

PathLike = str | os.PathLike

TSV_SPLITS = ("train", "test")


def load_tokenizer(path_or_id: PathLike, *, local_files_only: bool | None = None) -> Any:
    """Loads a tokenizer from a local file or folder, or from the Hugging Face hub.

    Args:
      path_or_id: A ``tokenizer.json`` file (read with `tokenizers.Tokenizer`), a
        folder saved with ``save_pretrained`` (read with
        ``transformers.AutoTokenizer``), or a hub id such as
        ``"bert-base-uncased"``.
      local_files_only: Forbid the hub. None means "when ``$ATM_JAX_OFFLINE`` or
        ``$HF_HUB_OFFLINE`` is set".

    Returns:
      A ``tokenizers.Tokenizer`` or a ``transformers`` tokenizer, both accepted
      by `tokenize`.

    Raises:
      TokenizerUnavailableError: If nothing can be loaded; the message says how
        to save the tokenizer to a folder on a machine with network.
    """
    path = pathlib.Path(path_or_id).expanduser()
    if path.is_file():
        import tokenizers

        return tokenizers.Tokenizer.from_file(str(path))
    if local_files_only is None:
        hub_offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes")
        local_files_only = files.offline() or hub_offline
    from transformers import AutoTokenizer

    try:
        if path.is_dir():
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return AutoTokenizer.from_pretrained(str(path_or_id), local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        where = "the local folder" if path.is_dir() else "the hub or the local cache"
        raise TokenizerUnavailableError(
            f"Could not load tokenizer {str(path_or_id)!r} from {where}: {e}\n"
            f"On a machine with network, save it with `python -c \"from transformers import "
            f"AutoTokenizer; AutoTokenizer.from_pretrained('{path_or_id}')"
            f".save_pretrained('DIR')\"` (or `hf download {path_or_id} --local-dir DIR`), "
            f"copy DIR here and pass its path instead."
        ) from e


def _pad_id(tokenizer) -> int:
    padding = tokenizer.padding
    if padding and padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    for token in ("[PAD]", "<pad>", "<PAD>"):
        index = tokenizer.token_to_id(token)
        if index is not None:
            return int(index)
    return 0


def _tokenize_fast(tokenizer, texts, pairs, max_length) -> np.ndarray:
    import tokenizers

    # A copy, so the caller's padding and truncation settings stay untouched.
    tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(length=max_length, pad_id=_pad_id(tokenizer))
    inputs = list(texts) if pairs is None else list(zip(texts, pairs, strict=True))
    encodings = tok.encode_batch(inputs)
    out = np.zeros((len(encodings), 3, max_length), np.int32)
    for i, encoding in enumerate(encodings):
        out[i, 0] = encoding.ids
        out[i, 1] = encoding.attention_mask
        out[i, 2] = encoding.type_ids
    return out


def tokenize(
    tokenizer: Any,
    texts: Sequence[str],
    pairs: Sequence[str] | None = None,
    max_length: int = 128,
) -> np.ndarray:
    """Tokenizes sentences or sentence pairs, padded and truncated to ``max_length``.

    Pairs are truncated longest-first, the default of both BERT and RoBERTa
    tokenizers. Tokenizers that give no token type ids (RoBERTa) get zeros.

    Args:
      tokenizer: A ``transformers`` tokenizer or a ``tokenizers.Tokenizer``.
      texts: N first sentences.
      pairs: N second sentences, or None for single-sentence tasks.
      max_length: Sequence length L.

    Returns:
      int32 [N, 3, L]: input_ids, attention_mask, token_type_ids.
    """
    import tokenizers

    texts = [str(t) for t in texts]
    if pairs is not None:
        pairs = [str(t) for t in pairs]
        if len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pairs)} pairs")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not texts:
        return np.zeros((0, 3, max_length), np.int32)
    if isinstance(tokenizer, tokenizers.Tokenizer):
        return _tokenize_fast(tokenizer, texts, pairs, max_length)
    encoded = tokenizer(
        texts,
        pairs,
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_attention_mask=True,
        return_token_type_ids=True,
        return_tensors="np",
    )
    ids = np.asarray(encoded["input_ids"], np.int32)
    mask = np.asarray(encoded["attention_mask"], np.int32)
    types = encoded.get("token_type_ids")
    types = np.zeros_like(ids) if types is None else np.asarray(types, np.int32)
    return np.stack([ids, mask, types], axis=1)


def read_tsv(path: PathLike) -> tuple[list[str], list[str] | None, np.ndarray]:
    """Reads one TSV split (see the module docstring for the columns).

    Returns:
      (texts [N], second texts [N] or None, int32 labels [N]).

    Raises:
      FileNotFoundError: If the file is missing.
      ValueError: If the header or a row is malformed.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"TSV split {path} does not exist; expected columns text[, text_b], label "
            "(see atm_jax/data/text.py)."
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise ValueError(f"{path} is empty; expected a header line")
    header = lines[0].split("\t")
    if header not in (["text", "label"], ["text", "text_b", "label"]):
        raise ValueError(
            f"{path}: header must be 'text<TAB>label' or 'text<TAB>text_b<TAB>label', "
            f"got {lines[0]!r}"
        )
    texts, pairs, labels = [], [], []
    for number, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ValueError(f"{path}:{number}: expected {len(header)} fields, got {len(fields)}")
        try:
            labels.append(int(fields[-1]))
        except ValueError:
            raise ValueError(f"{path}:{number}: label {fields[-1]!r} is not an integer") from None
        texts.append(fields[0])
        if len(header) == 3:
            pairs.append(fields[1])
    return texts, (pairs if len(header) == 3 else None), np.asarray(labels, np.int32)


def write_tsv(
    path: PathLike, texts: Sequence[str], labels: Sequence[int], pairs: Sequence[str] | None = None
) -> None:
    """Writes one TSV split readable by `read_tsv`."""
    rows = ["text\tlabel" if pairs is None else "text\ttext_b\tlabel"]
    columns = (texts,) if pairs is None else (texts, pairs)
    for *fields, label in zip(*columns, labels, strict=True):
        if any("\t" in f or "\n" in f for f in fields):
            raise ValueError(f"fields may not contain tabs or newlines: {fields!r}")
        rows.append("\t".join([*fields, str(int(label))]))
    pathlib.Path(path).write_text("\n".join(rows) + "\n", encoding="utf-8")


def tsv_class_names(task_root: PathLike) -> tuple[str, ...] | None:
    """Class names from ``<task root>/labels.txt``, or None if there is none."""
    path = pathlib.Path(task_root) / "labels.txt"
    if not path.is_file():
        return None
    return tuple(line for line in path.read_text(encoding="utf-8").splitlines() if line)
