"""Stand-ins for the paper's data and weights, for the full-size CPU rehearsal and tests.

`benchmarks/rehearsal.py` runs the paper configs (configs/vit.py, configs/bert.py)
with the real CLIP ViT-B/16 and BERT-base shapes on a machine that has neither
the pretrained weights nor the datasets. This module writes what the paper suite
reads in their place, in the layouts `atm_jax.data.paper.load_paper_task` and
`atm_jax.models.hf.load` read. It is a test helper, not part of the package: tests
import it as ``rehearsal_data`` (tests/ is on their path), the benchmark puts
tests/ on ``sys.path`` first.

* `write_image_tasks`: the seven vision tasks under their paper names with their
  class counts (`PAPER_TASKS` class names), as image folders
  ``root/<task>/{train,test}/<class number>/<n>.png`` of small random images (the
  model resizes them to its input size on device);
* `write_text_tasks`: the seven GLUE tasks with their class counts and sentence
  pairs as TSVs ``root/<task>/{train,test}.tsv`` + ``labels.txt`` of random
  sentences over the local word list, and a BERT-style word-level tokenizer
  covering them in ``root/tokenizer``;
* `write_prompt_tokenizer`: a word-level tokenizer covering the tasks' zero-shot
  prompts, for the random-init CLIP text tower;
* `write_hf_model`: a random-init Hugging Face CLIP or BERT folder (transformers
  and torch), full size or tiny;
* `write_clip_vision_model` / `write_bert_classifier`: a finetuned pool's folders in
  the published layouts (FusionBench's ``CLIPVisionModel`` task checkpoints,
  ``BertForSequenceClassification``) from our params, without torch.

Labels are random, so the accuracies mean nothing; shapes and code paths are the
paper's. Everything is deterministic in ``seed``.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from atm_jax.data import local, text
from atm_jax.data.paper_tasks import GLUE_TASKS, PAPER_TASKS, VISION_TASKS

__all__ = ["CLIP_SPECIAL", "TINY_BERT", "TINY_CLIP", "VIT_B16", "prompt_words",
           "write_bert_classifier", "write_clip_vision_model", "write_hf_model",
           "write_image_tasks", "write_prompt_tokenizer", "write_text_tasks"]

PathLike = str | os.PathLike

# [PAD], [UNK], [SOS], [EOS] = 0, 1, 2, 3; the random CLIP's text config names the same ids.
CLIP_SPECIAL = ("[PAD]", "[UNK]", "[SOS]", "[EOS]")
# CLIP ViT-B/16's vision tower (openai/clip-vit-base-patch16); the text tower keeps
# transformers' defaults, which are ViT-B's (12 layers, width 512, 77 tokens).
VIT_B16 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
           "num_attention_heads": 12, "image_size": 224, "patch_size": 16}
TINY_CLIP = {"vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                               "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
             "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 2, "vocab_size": 2000,
                             "max_position_embeddings": 77},
             "projection_dim": 16}
TINY_BERT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2, "vocab_size": 200, "max_position_embeddings": 128}


def _check_tasks(tasks: Sequence[str], allowed: Sequence[str], kind: str) -> None:
    unknown = [t for t in tasks if t not in allowed]
    if unknown or not tasks:
        raise ValueError(f"{kind} tasks {list(tasks)!r}: unknown {unknown!r}; choose from "
                         f"{', '.join(allowed)}")


def write_image_tasks(root: PathLike, tasks: Sequence[str] = VISION_TASKS, *,
                      min_train: int = 40, train_per_class: int = 2, test_per_class: int = 1,
                      side: int = 32, seed: int = 0) -> pathlib.Path:
    """Writes the vision tasks as image folders of random ``side``×``side`` PNGs.

    Args:
      root: where ``root/<task>/`` go.
      tasks: names from `VISION_TASKS`.
      min_train: at least this many training images per task (more per class for
        tasks with few classes, so the 10% validation cut is never empty).
      train_per_class / test_per_class: images per class, at least.
      side: image side in pixels (all the same, so they load at native size).
      seed: seed of the pixels.

    Returns:
      ``root`` as a path.
    """
    from PIL import Image

    _check_tasks(tasks, VISION_TASKS, "vision")
    root = pathlib.Path(root).expanduser()
    for t, name in enumerate(tasks):
        classes = len(PAPER_TASKS[name].class_names)
        per_class = {"train": max(train_per_class, -(-min_train // classes)),
                     "test": test_per_class}
        rng = np.random.default_rng([seed, t])
        for split, count in per_class.items():
            for c in range(classes):
                folder = root / name / split / f"{c:03d}"
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def write_text_tasks(root: PathLike, tasks: Sequence[str] = GLUE_TASKS, *, train_size: int = 64,
                     test_size: int = 16, words: tuple[int, int] = (8, 40), seed: int = 0
                     ) -> pathlib.Path:
    """Writes the GLUE tasks as TSVs of random sentences, and their tokenizer.

    Sentence-pair tasks (two text keys in `PAPER_TASKS`) get pairs; labels are
    drawn uniformly from the task's classes. The tokenizer (``root/tokenizer``,
    `local.build_tokenizer`) knows every word used.

    Args:
      root: where ``root/<task>/`` and ``root/tokenizer/`` go.
      tasks: names from `GLUE_TASKS`.
      train_size / test_size: examples per split.
      words: (fewest, most) words per sentence.
      seed: seed of the sentences and labels.

    Returns:
      ``root`` as a path.
    """
    _check_tasks(tasks, GLUE_TASKS, "GLUE")
    root = pathlib.Path(root).expanduser()
    vocabulary = np.asarray(local.local_vocabulary())
    for t, name in enumerate(tasks):
        spec = PAPER_TASKS[name]
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, t])

        def sentences(n, rng=rng):
            return [" ".join(rng.choice(vocabulary, rng.integers(words[0], words[1] + 1)))
                    for _ in range(n)]

        for split, n in (("train", train_size), ("test", test_size)):
            first = sentences(n)
            pairs = sentences(n) if len(spec.text_keys) > 1 else None
            labels = rng.integers(0, len(spec.class_names), n)
            text.write_tsv(folder / f"{split}.tsv", first, labels, pairs)
        (folder / "labels.txt").write_text("\n".join(spec.class_names) + "\n")
    local.save_tokenizer(local.build_tokenizer(), root / "tokenizer")
    return root


def prompt_words(tasks: Sequence[str]) -> list[str]:
    """Every token of the tasks' zero-shot prompts (templates × class names), as the
    prompt tokenizer splits them (lower case, words and punctuation apart)."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    found: set[str] = set()
    for name in tasks:
        spec = PAPER_TASKS[name]
        for template in spec.templates:
            for c in spec.class_names:
                found.update(w for w, _ in split.pre_tokenize_str(template.format(c=c).lower()))
    return sorted(found)


def write_prompt_tokenizer(path: PathLike, tasks: Sequence[str] = VISION_TASKS) -> pathlib.Path:
    """Writes ``tokenizer.json``: a word-level tokenizer over the tasks' prompts that
    wraps each prompt as ``[SOS] ... [EOS]`` (ids 2 and 3, `CLIP_SPECIAL`).

    Returns:
      The written file's path.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    _check_tasks(tasks, VISION_TASKS, "vision")
    vocab = {w: i for i, w in enumerate([*CLIP_SPECIAL, *prompt_words(tasks)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[SOS] $A [EOS]", special_tokens=[("[SOS]", 2), ("[EOS]", 3)])
    path = pathlib.Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def write_hf_model(model: str, folder: PathLike, *, tiny: bool = False, seed: int = 0,
                   vocab_size: int | None = None, text_config: dict | None = None
                   ) -> pathlib.Path:
    """Writes a random-init Hugging Face model folder (config.json + model.safetensors).

    Args:
      model: "clip" (CLIPModel with the ViT-B/16 vision tower) or "bert"
        (BertModel with BERT-base's default config).
      folder: the folder to write.
      tiny: a tiny config of the same architecture instead (tests).
      seed: torch's seed for the init.
      vocab_size: the text vocabulary (default: the config's); at least the
        tokenizer's.
      text_config: CLIP only: overrides of the text tower's config (e.g. fewer
        layers: it only encodes the zero-shot prompts once, and is never trained).

    Returns:
      ``folder`` as a path.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    if model == "clip":
        special = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
        vision = dict(TINY_CLIP["vision_config"] if tiny else VIT_B16)
        text_cfg = {**(TINY_CLIP["text_config"] if tiny else {}), **(text_config or {}),
                    **special}
        if vocab_size:
            text_cfg["vocab_size"] = vocab_size
        extra = {"projection_dim": TINY_CLIP["projection_dim"]} if tiny else {}
        net = transformers.CLIPModel(transformers.CLIPConfig(
            vision_config=vision, text_config=text_cfg, **extra))
    elif model == "bert":
        cfg = dict(TINY_BERT) if tiny else {}
        if vocab_size:
            cfg["vocab_size"] = vocab_size
        net = transformers.BertModel(transformers.BertConfig(**cfg))
    else:
        raise ValueError(f"model={model!r}: the rehearsal writes 'clip' or 'bert'")
    folder = pathlib.Path(folder).expanduser()
    net.save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") not in ("clip", "bert"):
        raise RuntimeError(f"{folder}/config.json has model_type {config.get('model_type')!r}")
    return folder


def _hf_tensors(family: str, params: dict) -> dict[str, np.ndarray]:
    """Our params under their HF names and layouts, leaf by leaf (`atm_jax.models.hf`'s
    key map; no config needed, so no shapes are traced)."""
    import jax

    from atm_jax.models import hf

    out = {}
    for keys, leaf in jax.tree_util.tree_leaves_with_path(params):
        name, transform = hf.hf_name(family, tuple(str(k.key) for k in keys))
        out[name] = np.array(transform.to_hf(np.asarray(leaf, np.float32)), order="C")
    return out


def write_clip_vision_model(folder: PathLike, config: dict, params: dict, *,
                            drop: Sequence[str] = (), prefixed: bool = True) -> pathlib.Path:
    """Writes the image encoder of CLIP ``params`` as a ``CLIPVisionModel`` folder, the
    layout of FusionBench's published task checkpoints: ``vision_model.*`` tensors only
    (no ``visual_projection``), and the vision config with model_type
    ``clip_vision_model``.

    Args:
      folder: the folder to write.
      config: the HF ``CLIPConfig`` dict of ``params``.
      params: full CLIP params ``{"vision", "text", "logit_scale"}`` (ours).
      drop: HF tensor names to leave out as well (a damaged checkpoint).
      prefixed: names under ``vision_model.`` as transformers 4 saved them (FusionBench's);
        False: without it, as transformers 5's ``save_pretrained`` writes them.

    Returns:
      ``folder`` as a path.
    """
    from safetensors.numpy import save_file

    tower = "vision_model."
    tensors = {(n if prefixed else n[len(tower):]): t
               for n, t in _hf_tensors("clip", {"vision": params["vision"]}).items()
               if n.startswith(tower) and n not in drop}
    folder = pathlib.Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    vision = {**config["vision_config"], "model_type": "clip_vision_model",
              "architectures": ["CLIPVisionModel"], "projection_dim": config["projection_dim"]}
    (folder / "config.json").write_text(json.dumps(vision, indent=2, sort_keys=True) + "\n")
    return folder


def write_bert_classifier(folder: PathLike, config: dict, params: dict, head: dict
                          ) -> pathlib.Path:
    """Writes BERT ``params`` with a linear ``head`` on the pooled output as a
    ``BertForSequenceClassification`` folder (encoder under ``bert.``, the head as
    ``classifier.weight`` [C, H] and ``classifier.bias`` [C]).

    Args:
      folder: the folder to write.
      config: the HF ``BertConfig`` dict of ``params``.
      params: our BERT encoder params.
      head: ``{"kernel": [H, C], "bias": [C]}`` (ours).

    Returns:
      ``folder`` as a path.
    """
    from safetensors.numpy import save_file

    tensors = {f"bert.{n}": t for n, t in _hf_tensors("bert", params).items()}
    tensors["classifier.weight"] = np.ascontiguousarray(np.asarray(head["kernel"], np.float32).T)
    tensors["classifier.bias"] = np.asarray(head["bias"], np.float32)
    folder = pathlib.Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    classes = int(np.shape(head["bias"])[0])
    out = {**config, "architectures": ["BertForSequenceClassification"],
           "id2label": {str(i): f"LABEL_{i}" for i in range(classes)},
           "label2id": {f"LABEL_{i}": i for i in range(classes)}}
    (folder / "config.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    return folder
