"""Tiny deterministic local tasks for the paper setups' shrink configs.

The paper's setups (CLIP on 7 image tasks, BERT/RoBERTa on 7 GLUE tasks) need
downloads this machine cannot make. Their shrink configs run the same code paths
end to end on small tasks written here in seconds, with no network:

* `make_image_folder` writes image-folder tasks (`atm_jax.data.image_folder`
  layout) of glyphs drawn by `atm_jax.data.glyphs.render_glyphs`, each task its
  own character set and colours, so the tasks are learnable and distinct::

    <root>/<task>/{train,test}/<class>/<00000>.png
    <root>/<task>/.complete        (marker: the parameters it was written with)

* `make_text_tasks` writes TSV text tasks (`atm_jax.data.text` layout) of
  template sentences whose label is decided by keywords: a single-sentence
  sentiment task, a single-sentence 3-topic task, and a sentence-pair task
  (same topic or not); plus a word-level tokenizer covering their vocabulary::

    <root>/<task>/{train,test}.tsv, labels.txt, .complete
    <root>/tokenizer/tokenizer.json, tokenizer_config.json

  ``text.load_tokenizer(root / "tokenizer")`` reads the tokenizer with
  transformers' ``AutoTokenizer``; ``root / "tokenizer" / "tokenizer.json"`` reads
  it as a `tokenizers.Tokenizer`.

Both are idempotent: a task whose marker records the same parameters is reused;
otherwise it is rewritten (into a temporary folder, then moved into place). The
same parameters always give byte-identical files. Load the tasks with
``paper.load_paper_task(task, source="folder" | "tsv", folder=root)``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Sequence

import numpy as np

from atm_jax.data import glyphs, text
from atm_jax.data.splits import named_rng

PathLike = str | os.PathLike

_VERSION = 1
_MARKER = ".complete"

IMAGE_TASKS: dict[str, tuple[str, tuple[int, int, int], tuple[int, int, int]]] = {
    "glyph_digits": ("0123456789", (255, 255, 255), (0, 0, 0)),
    "glyph_upper": ("ABCDEFGHJK", (255, 220, 0), (0, 40, 140)),
    "glyph_lower": ("abdefghmnr", (200, 0, 0), (235, 235, 235)),
    "glyph_mixed": ("LMNPQRSTUV", (0, 200, 80), (60, 60, 60)),
}
"""Local image tasks: (characters = classes, glyph RGB colour, background colour)."""

_SUBJECTS = ("the critic", "my friend", "the audience", "our team", "a reviewer", "the kids")
_THINGS = ("movie", "show", "book", "play", "song", "game")
_FILLERS = ("yesterday", "at night", "again", "this week", "on sunday", "after dinner")
_SENTIMENT = (
    ("awful", "boring", "terrible", "dreadful", "clumsy", "tedious"),
    ("great", "wonderful", "delightful", "brilliant", "charming", "superb"),
)
_TOPICS = (
    ("football", "tennis", "goal", "match", "coach", "stadium"),
    ("pasta", "bread", "soup", "kitchen", "recipe", "dessert"),
    ("rain", "snow", "storm", "sunshine", "wind", "forecast"),
)

TEXT_TASKS: dict[str, tuple[str, ...]] = {
    "keyword_sentiment": ("negative", "positive"),
    "keyword_topic": ("sports", "food", "weather"),
    "keyword_pair": ("different", "same"),
}
"""Local text tasks and their class names; ``keyword_pair`` is a sentence-pair task."""

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _ready(folder: pathlib.Path, params: dict) -> bool:
    marker = folder / _MARKER
    try:
        return json.loads(marker.read_text()) == params
    except (OSError, ValueError):
        return False


def _write_task(root: pathlib.Path, name: str, params: dict, write: Callable[[pathlib.Path], None]):
    """Writes a task folder atomically, with its marker, unless already complete."""
    folder = root / name
    if _ready(folder, params):
        return
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the data is not.
    try:
        write(tmp)
        (tmp / _MARKER).write_text(json.dumps(params, sort_keys=True))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def glyph_images(
    characters: str,
    n: int,
    *,
    foreground: tuple[int, int, int],
    background: tuple[int, int, int],
    image_size: int = 32,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Coloured glyph images: ``n`` images, classes balanced, label i = characters[i].

    Returns:
      (uint8 [n, image_size, image_size, 3], int32 [n]).
    """
    from PIL import Image

    gray, labels = glyphs.render_glyphs(n, seed=seed, classes=tuple(characters))
    rng = np.random.default_rng(seed)
    # Colours jitter a little per image, so a task is not solved by colour alone.
    jitter = rng.integers(-25, 26, size=(n, 2, 3))
    fg = np.clip(np.asarray(foreground) + jitter[:, 0], 0, 255)[:, None, None, :]
    bg = np.clip(np.asarray(background) + jitter[:, 1], 0, 255)[:, None, None, :]
    rgb = np.rint(bg + gray * (fg - bg)).astype(np.uint8)
    if image_size != rgb.shape[1]:
        rgb = np.stack(
            [
                np.asarray(
                    Image.fromarray(x).resize((image_size, image_size), Image.Resampling.BICUBIC)
                )
                for x in rgb
            ]
        )
    return rgb, labels


def make_image_folder(
    root: PathLike,
    tasks: Sequence[str] = tuple(IMAGE_TASKS),
    *,
    per_class: int = 30,
    test_per_class: int | None = None,
    image_size: int = 32,
    seed: int = 0,
) -> pathlib.Path:
    """Writes small RGB image-folder tasks of glyphs (see the module docstring).

    Args:
      root: Suite root; task ``t`` lands in ``root/t``.
      tasks: Names from `IMAGE_TASKS`.
      per_class: Training images per class.
      test_per_class: Test images per class; None means ``per_class // 2``.
      image_size: Side of the square PNGs.
      seed: Seed of the glyph rendering.

    Returns:
      ``root`` as a path.
    """
    root = pathlib.Path(root).expanduser()
    test_per_class = max(1, per_class // 2) if test_per_class is None else test_per_class
    for name in tasks:
        if name not in IMAGE_TASKS:
            raise ValueError(f"Unknown local image task {name!r}; known: {', '.join(IMAGE_TASKS)}")
        characters, fg, bg = IMAGE_TASKS[name]
        params = dict(
            version=_VERSION, kind="image", characters=characters, foreground=list(fg),
            background=list(bg), per_class=per_class, test_per_class=test_per_class,
            image_size=image_size, seed=seed,
        )  # fmt: skip

        def write(folder, name=name, characters=characters, fg=fg, bg=bg):
            from PIL import Image

            for split, count in (("train", per_class), ("test", test_per_class)):
                split_seed = int(named_rng(seed, name, split).integers(2**31))
                images, labels = glyph_images(
                    characters, count * len(characters), foreground=fg, background=bg,
                    image_size=image_size, seed=split_seed,
                )  # fmt: skip
                for c in characters:
                    (folder / split / c).mkdir(parents=True)
                for i, (image, label) in enumerate(zip(images, labels, strict=True)):
                    Image.fromarray(image).save(folder / split / characters[label] / f"{i:05d}.png")

        _write_task(root, name, params, write)
    return root


def _sentiment(rng: np.random.Generator, label: int) -> str:
    subject, thing, filler = (str(rng.choice(x)) for x in (_SUBJECTS, _THINGS, _FILLERS))
    adjective = str(rng.choice(_SENTIMENT[label]))
    if rng.random() < 0.5:
        return f"{subject} said the {thing} was {adjective} {filler}"
    return f"{filler} {subject} found the {thing} {adjective}"


def _topic(rng: np.random.Generator, label: int) -> str:
    subject, filler = str(rng.choice(_SUBJECTS)), str(rng.choice(_FILLERS))
    first, second = (str(w) for w in rng.choice(_TOPICS[label], size=2, replace=False))
    if rng.random() < 0.5:
        return f"{subject} talked about the {first} {filler}"
    return f"{subject} read about {first} and {second} {filler}"


def _examples(name: str, n: int, rng: np.random.Generator):
    labels = rng.permutation(np.arange(n) % len(TEXT_TASKS[name]))
    if name == "keyword_sentiment":
        return [_sentiment(rng, y) for y in labels], None, labels
    if name == "keyword_topic":
        return [_topic(rng, y) for y in labels], None, labels
    texts, pairs = [], []
    for same in labels:
        first = int(rng.integers(len(_TOPICS)))
        other = (first + 1 + int(rng.integers(len(_TOPICS) - 1))) % len(_TOPICS)
        texts.append(_topic(rng, first))
        pairs.append(_topic(rng, first if same else other))
    return texts, pairs, labels


def local_vocabulary() -> tuple[str, ...]:
    """Every word the local text tasks use, sorted."""
    words: set[str] = set("said the was found talked about read and".split())
    for group in (_SUBJECTS, _THINGS, _FILLERS, *_SENTIMENT, *_TOPICS):
        for phrase in group:
            words.update(phrase.split())
    return tuple(sorted(words))


def build_tokenizer():
    """A deterministic BERT-style word-level tokenizer for the local text tasks.

    Lower-cases, splits on whitespace and punctuation, maps unknown words to
    ``[UNK]`` and wraps inputs as ``[CLS] a [SEP]`` / ``[CLS] a [SEP] b [SEP]``
    with token type ids 0 / 1, like BERT.

    Returns:
      A ``tokenizers.Tokenizer``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *local_vocabulary()))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return tokenizer


def save_tokenizer(tokenizer, folder: PathLike) -> pathlib.Path:
    """Saves a ``tokenizers.Tokenizer`` as a folder ``AutoTokenizer`` can load."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "[UNK]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
        "model_max_length": 512,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def make_text_tasks(
    root: PathLike,
    tasks: Sequence[str] = tuple(TEXT_TASKS),
    *,
    train_size: int = 400,
    test_size: int = 200,
    seed: int = 0,
) -> pathlib.Path:
    """Writes tiny TSV text-classification tasks and their tokenizer.

    Args:
      root: Suite root; task ``t`` lands in ``root/t``, the tokenizer in
        ``root/tokenizer``.
      tasks: Names from `TEXT_TASKS`.
      train_size: Training examples per task (classes balanced).
      test_size: Test examples per task.
      seed: Seed of the sentence generator.

    Returns:
      ``root`` as a path.
    """
    root = pathlib.Path(root).expanduser()
    for name in tasks:
        if name not in TEXT_TASKS:
            raise ValueError(f"Unknown local text task {name!r}; known: {', '.join(TEXT_TASKS)}")
        params = dict(
            version=_VERSION, kind="text", train_size=train_size, test_size=test_size, seed=seed
        )

        def write(folder, name=name):
            for split, n in (("train", train_size), ("test", test_size)):
                texts, pairs, labels = _examples(name, n, named_rng(seed, name, split))
                text.write_tsv(folder / f"{split}.tsv", texts, labels, pairs)
            (folder / "labels.txt").write_text("\n".join(TEXT_TASKS[name]) + "\n")

        _write_task(root, name, params, write)
    params = dict(version=_VERSION, kind="tokenizer", vocabulary=list(local_vocabulary()))
    _write_task(root, "tokenizer", params, lambda folder: save_tokenizer(build_tokenizer(), folder))
    return root


def tokenizer_path(root: PathLike) -> pathlib.Path:
    """Folder of the tokenizer `make_text_tasks` writes under ``root``."""
    return pathlib.Path(root).expanduser() / "tokenizer"
