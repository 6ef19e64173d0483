"""The registry of the paper's 14 tasks (arXiv 2411.03055, Sec. 5).

For each task: its modality, tfds name and splits, class names, feature keys
(GLUE) and the zero-shot prompt templates of task vectors (arXiv 2212.04089,
``src/datasets/templates.py``), whose class names are used here too. Loading and
splitting are in `atm_jax.data.paper`.
"""

from __future__ import annotations

import dataclasses

__all__ = ["PaperTask", "PAPER_TASKS", "VISION_TASKS", "GLUE_TASKS"]


@dataclasses.dataclass(frozen=True)
class PaperTask:
    """Where a task of the paper comes from and how it is labelled.

    Attributes:
      name: Task name, a key of `PAPER_TASKS`.
      modality: "image" or "text".
      tfds_name: tensorflow-datasets name[/config], or None (GTSRB).
      train_split: tfds split expression finetuned on (after the 90/10 cut).
      test_split: tfds split evaluated on, or None to carve ``test_fraction``
        of ``train_split`` out as the test set.
      class_names: Name of each label 0..C-1, in the source's label order.
      templates: Zero-shot prompt templates (vision), ``str.format`` strings
        with a ``{c}`` field for the class name.
      text_keys: Feature keys of the sentence (pair) for text tasks.
      image_key: Feature key of the image for vision tasks.
      label_key: Feature key of the label.
      test_fraction: Share of ``train_split`` carved out as test when
        ``test_split`` is None.
    """

    name: str
    modality: str
    tfds_name: str | None
    train_split: str
    test_split: str | None
    class_names: tuple[str, ...]
    templates: tuple[str, ...] = ()
    text_keys: tuple[str, ...] = ()
    image_key: str = "image"
    label_key: str = "label"
    test_fraction: float | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return len(self.class_names)

    def prompts(self, class_name: str) -> list[str]:
        """The zero-shot prompts of one class: every template filled in."""
        return [template.format(c=class_name) for template in self.templates]


_DIGITS = tuple(str(d) for d in range(10))

# Class names are those task vectors builds its zero-shot heads from. CIFAR100's
# are torchvision's (and tfds') fine label names, underscores kept as task
# vectors keeps them.
_CIFAR100 = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle",
    "bicycle", "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can",
    "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud",
    "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin",
    "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo",
    "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man",
    "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree",
    "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray",
    "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
    "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower",
    "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf",
    "woman", "worm",
)  # fmt: skip

# The 47 DTD "key attributes", sorted (tfds' and ImageFolder's label order).
_DTD = (
    "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed",
    "cracked", "crosshatched", "crystalline", "dotted", "fibrous", "flecked",
    "freckled", "frilly", "gauzy", "grid", "grooved", "honeycombed", "interlaced",
    "knitted", "lacelike", "lined", "marbled", "matted", "meshed", "paisley",
    "perforated", "pitted", "pleated", "polka-dotted", "porous", "potholed", "scaly",
    "smeared", "spiralled", "sprinkled", "stained", "stratified", "striped",
    "studded", "swirly", "veined", "waffled", "woven", "wrinkled", "zigzagged",
)  # fmt: skip

# EuroSAT's folder names (AnnualCrop, Forest, HerbaceousVegetation, Highway,
# Industrial, Pasture, PermanentCrop, Residential, River, SeaLake) renamed to the
# descriptions of OpenAI's CLIP prompts, as task vectors does.
_EUROSAT = (
    "annual crop land",
    "forest",
    "brushland or shrubland",
    "highway or road",
    "industrial buildings or commercial buildings",
    "pasture land",
    "permanent crop land",
    "residential buildings or homes or apartments",
    "river",
    "lake or sea",
)

# GTSRB's 43 classes described as in OpenAI CLIP's prompts (typos included).
_GTSRB = (
    "red and white circle 20 kph speed limit",
    "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit",
    "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit",
    "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit",
    "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit",
    "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing",
    "red and white triangle road intersection warning",
    "white and yellow diamond priority road",
    "red and white upside down triangle yield right-of-way",
    "stop",
    "empty red and white circle",
    "red and white circle no truck entry",
    "red circle with white horizonal stripe no entry",
    "red and white triangle with exclamation mark warning",
    "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning",
    "red and white triangle rough / bumpy road warning",
    "red and white triangle car skidding / slipping warning",
    "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning",
    "red and white triangle with person walking warning",
    "red and white triangle with child and person walking warning",
    "red and white triangle with bicyle warning",
    "red and white triangle with snowflake / ice warning",
    "red and white triangle with deer warning",
    "white circle with gray strike bar no speed limit",
    "blue circle with white right turn arrow mandatory",
    "blue circle with white left turn arrow mandatory",
    "blue circle with white forward arrow mandatory",
    "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory",
    "blue circle with white keep right arrow mandatory",
    "blue circle with white keep left arrow mandatory",
    "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
)

# RESISC45's folder names, sorted, with underscores read as spaces.
_RESISC45 = (
    "airplane", "airport", "baseball diamond", "basketball court", "beach", "bridge",
    "chaparral", "church", "circular farmland", "cloud", "commercial area",
    "dense residential", "desert", "forest", "freeway", "golf course",
    "ground track field", "harbor", "industrial area", "intersection", "island",
    "lake", "meadow", "medium residential", "mobile home park", "mountain",
    "overpass", "palace", "parking lot", "railway", "railway station",
    "rectangular farmland", "river", "roundabout", "runway", "sea ice", "ship",
    "snowberg", "sparse residential", "stadium", "storage tank", "tennis court",
    "terrace", "thermal power station", "wetland",
)  # fmt: skip

# Zero-shot prompt templates of task vectors (src/datasets/templates.py), written
# as str.format strings; {c} is the class name.
_CIFAR100_TEMPLATES = (
    "a photo of a {c}.",
    "a blurry photo of a {c}.",
    "a black and white photo of a {c}.",
    "a low contrast photo of a {c}.",
    "a high contrast photo of a {c}.",
    "a bad photo of a {c}.",
    "a good photo of a {c}.",
    "a photo of a small {c}.",
    "a photo of a big {c}.",
    "a photo of the {c}.",
    "a blurry photo of the {c}.",
    "a black and white photo of the {c}.",
    "a low contrast photo of the {c}.",
    "a high contrast photo of the {c}.",
    "a bad photo of the {c}.",
    "a good photo of the {c}.",
    "a photo of the small {c}.",
    "a photo of the big {c}.",
)
_DTD_TEMPLATES = (
    "a photo of a {c} texture.",
    "a photo of a {c} pattern.",
    "a photo of a {c} thing.",
    "a photo of a {c} object.",
    "a photo of the {c} texture.",
    "a photo of the {c} pattern.",
    "a photo of the {c} thing.",
    "a photo of the {c} object.",
)
_EUROSAT_TEMPLATES = (
    "a centered satellite photo of {c}.",
    "a centered satellite photo of a {c}.",
    "a centered satellite photo of the {c}.",
)
_GTSRB_TEMPLATES = (
    'a zoomed in photo of a "{c}" traffic sign.',
    'a centered photo of a "{c}" traffic sign.',
    'a close up photo of a "{c}" traffic sign.',
)
_NUMBER_TEMPLATES = (
    'a photo of the number: "{c}".',
)
_RESISC45_TEMPLATES = (
    "satellite imagery of {c}.",
    "aerial imagery of {c}.",
    "satellite photo of {c}.",
    "aerial photo of {c}.",
    "satellite view of {c}.",
    "aerial view of {c}.",
    "satellite imagery of a {c}.",
    "aerial imagery of a {c}.",
    "satellite photo of a {c}.",
    "aerial photo of a {c}.",
    "satellite view of a {c}.",
    "aerial view of a {c}.",
    "satellite imagery of the {c}.",
    "aerial imagery of the {c}.",
    "satellite photo of the {c}.",
    "aerial photo of the {c}.",
    "satellite view of the {c}.",
    "aerial view of the {c}.",
)


def _vision(name, tfds_name, train, test, classes, templates, **kwargs) -> PaperTask:
    return PaperTask(name, "image", tfds_name, train, test, classes, templates, **kwargs)


def _glue(name, classes, keys, test="validation") -> PaperTask:
    return PaperTask(name, "text", f"glue/{name}", "train", test, classes, text_keys=keys)


PAPER_TASKS: dict[str, PaperTask] = {
    task.name: task
    for task in (
        _vision("cifar100", "cifar100", "train", "test", _CIFAR100, _CIFAR100_TEMPLATES),
        # DTD's fold 1: task vectors trains on train1 + val1 (3,760), tests on test1.
        _vision("dtd", "dtd", "train+validation", "test", _DTD, _DTD_TEMPLATES),
        _vision(
            "eurosat", "eurosat/rgb", "train", None, _EUROSAT, _EUROSAT_TEMPLATES,
            test_fraction=0.1,
        ),
        _vision("gtsrb", None, "train", "test", _GTSRB, _GTSRB_TEMPLATES),
        _vision("mnist", "mnist", "train", "test", _DIGITS, _NUMBER_TEMPLATES),
        _vision(
            "resisc45", "resisc45", "train", None, _RESISC45, _RESISC45_TEMPLATES,
            test_fraction=0.2,
        ),
        _vision("svhn", "svhn_cropped", "train", "test", _DIGITS, _NUMBER_TEMPLATES),
        _glue("cola", ("unacceptable", "acceptable"), ("sentence",)),
        _glue("sst2", ("negative", "positive"), ("sentence",)),
        _glue("mrpc", ("not_equivalent", "equivalent"), ("sentence1", "sentence2")),
        _glue("qqp", ("not_duplicate", "duplicate"), ("question1", "question2")),
        _glue(
            "mnli", ("entailment", "neutral", "contradiction"), ("premise", "hypothesis"),
            test="validation_matched",
        ),
        _glue("qnli", ("entailment", "not_entailment"), ("question", "sentence")),
        _glue("rte", ("entailment", "not_entailment"), ("sentence1", "sentence2")),
    )
}  # fmt: skip

VISION_TASKS: tuple[str, ...] = tuple(n for n, t in PAPER_TASKS.items() if t.modality == "image")
"""The paper's 7 vision tasks."""
GLUE_TASKS: tuple[str, ...] = tuple(n for n, t in PAPER_TASKS.items() if t.modality == "text")
"""The paper's 7 GLUE tasks."""
