"""The full-size rehearsal's machinery at tiny size (benchmarks/rehearsal.py and
tests/rehearsal_data.py): stand-in tasks with the paper's names and class
counts, their tokenizers, a random-init HF folder the paper suite reads, and the
projection arithmetic against hand-computed numbers."""

import importlib.util
import pathlib

import numpy as np
import pytest

from atm_jax.data import paper

import rehearsal_data

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("rehearsal", ROOT / "benchmarks" / "rehearsal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_stand_ins_load_with_paper_names_and_class_counts(tmp_path):
    root = rehearsal_data.write_image_tasks(tmp_path, ("mnist", "dtd"), side=8)
    # mnist: 10 classes × max(2, ceil(40 / 10)) = 40 train images, 4 held out (10%);
    # dtd: 47 × 2 = 94, int(9.4) = 9 held out; one test image per class.
    for name, classes, train, val in (("mnist", 10, 36, 4), ("dtd", 47, 85, 9)):
        task = paper.load_paper_task(name, source="folder", folder=root)
        assert task.num_classes == classes == len(paper.PAPER_TASKS[name].class_names)
        assert (len(task.train[1]), len(task.validation[1]), len(task.test[1])) == (train, val,
                                                                                     classes)
        assert task.train[0].shape[1:] == (8, 8, 3) and task.train[0].dtype == np.uint8
        assert sorted(set(task.test[1].tolist())) == list(range(classes))


def test_text_stand_ins_have_pairs_where_glue_does_and_no_unknown_words(tmp_path):
    root = rehearsal_data.write_text_tasks(tmp_path, ("cola", "mnli"), train_size=20, test_size=6)
    for name, classes, pair in (("cola", 2, False), ("mnli", 3, True)):
        task = paper.load_paper_task(name, source="tsv", folder=root,
                                     tokenizer=root / "tokenizer" / "tokenizer.json",
                                     max_length=64)
        ids, mask, types = task.train[0][:, 0], task.train[0][:, 1], task.train[0][:, 2]
        assert task.num_classes == classes and task.class_names == \
            paper.PAPER_TASKS[name].class_names
        assert len(task.train[1]) + len(task.validation[1]) == 20 and len(task.test[1]) == 6
        assert bool((types == 1).any()) is pair  # segment B only for sentence pairs
        assert not (ids == 1).any()  # [UNK] (id 1 of local.SPECIAL_TOKENS) never appears
        assert (ids[:, 0] == 2).all() and (mask.sum(1) >= 10).all()  # [CLS], ≥ 8 words


def test_prompt_tokenizer_covers_every_prompt(tmp_path):
    import tokenizers

    path = rehearsal_data.write_prompt_tokenizer(tmp_path / "tok.json", ("cifar100", "gtsrb"))
    tok = tokenizers.Tokenizer.from_file(str(path))
    for name in ("cifar100", "gtsrb"):
        spec = paper.PAPER_TASKS[name]
        prompts = [t.format(c=c) for t in spec.templates for c in spec.class_names]
        for enc in tok.encode_batch(prompts):
            assert enc.ids[0] == 2 and enc.ids[-1] == 3 and 1 not in enc.ids


def test_bert_suite_reads_glue_tsvs_from_the_data_folder(tmp_path):
    """configs/bert.py with data.source=folder: the paper's GLUE names from TSVs,
    with a random-init HF folder as the weights (the rehearsal's path)."""
    from atm_jax import recipes
    from atm_jax.suites import paper as paper_suite

    bench = _bench()
    rehearsal_data.write_text_tasks(tmp_path / "data", ("rte", "sst2"), train_size=20, test_size=6)
    rehearsal_data.write_hf_model("bert", tmp_path / "hf_init", tiny=True)
    config = recipes.paper_config("bert")
    values = bench.overrides("bert", tmp_path, tiny=True)
    for path, value in {**values, "tasks": ("rte", "sst2")}.items():
        *parents, leaf = path.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    paper_suite.validate(config)
    setup = paper_suite.build(config, lambda *_: None)
    assert list(setup.tasks) == ["rte", "sst2"]
    assert {t: s.num_classes for t, s in setup.tasks.items()} == {"rte": 2, "sst2": 2}
    assert setup.tasks["rte"].train[0].shape[1:] == (3, 32)
    # The flags the rehearsal passes to atm_jax.main name the same values.
    flags = bench.flags({"data.train_size": 8, "tasks": ["rte", "sst2"]})
    assert flags == ["--config.data.train_size=8", "--config.tasks=('rte', 'sst2')"]


def test_projection_matches_hand_computed_bert_numbers():
    bench = _bench()
    # Per-example FLOPs 1 (8 per batch of 8), so the total is the example count.
    out = bench.project("bert", 8.0, 8.0)
    # GLUE train cuts (N - min(int(0.1 N), 5000)): 7696 + 62349 + 3302 + 358846 + 387702
    # + 99743 + 2241 = 921879; × (10 one-shot epochs + 10 ATM iterations).
    assert out["train_examples"] == 921879 * 20
    # Test sets 1043 + 872 + 408 + 40430 + 9815 + 5463 + 277 = 58308; passes: pretrained,
    # individual, 4 one-shot merges, ATM iterations 0..10.
    assert out["eval_passes"] == 17 and out["eval_examples"] == 58308 * 17
    total = 921879 * 20 + 58308 * 17
    assert out["total_flops"] == pytest.approx(total)
    assert out["hours"]["H200 @ MFU 30%"] == pytest.approx(total / (989e12 * 0.3) / 3600)
    assert out["hours"]["TPU v4-8 @ MFU 40%"] == pytest.approx(total / (1100e12 * 0.4) / 3600)


def test_summary_leaves_compiling_epochs_out_of_the_step_time(tmp_path):
    bench = _bench()
    (tmp_path / "hf" / "atm").mkdir(parents=True)
    (tmp_path / "hf" / "atm" / "model.safetensors").write_bytes(b"x" * 2**20)
    run = {"epochs": [{"seconds": 30.0, "steps": 1, "classes": 2},   # compiles
                      {"seconds": 4.0, "steps": 2, "classes": 2},    # 2.0 s / step
                      {"seconds": 20.0, "steps": 1, "classes": 3},   # compiles
                      {"seconds": 3.0, "steps": 1, "classes": 3},    # 3.0
                      {"seconds": 1.0, "steps": 1, "classes": 2}],   # 1.0
           "merges": [{"merge": "ties", "seconds": 5.0}, {"merge": "ties", "seconds": 7.0},
                      {"merge": "mean", "seconds": 1.0}],
           "saves": [{"seconds": 1.0}, {"seconds": 3.0}, {"seconds": 2.0}],
           "items": [{"seconds": 0.5}], "peak_rss_bytes": 3 * 2**30, "wall_seconds": 100.0}
    probe = {"params": 10, "exports": {"atm": {"max_abs_diff": 1e-7, "moved_from_base": 1e-3}},
             "train_step_flops": 8e9, "eval_forward_flops": 8e9}
    row = bench.summarize("bert", run, probe, tmp_path)
    assert row["step_seconds"] == 2.0 and row["steady_steps"] == 3
    assert row["merge_seconds"] == {"ties": 7.0, "mean": 1.0}  # upper median of [5, 7]
    assert (row["saves"], row["save_seconds"], row["save_seconds_max"]) == (3, 2.0, 3.0)
    assert row["peak_rss_gib"] == 3.0 and row["export_mib"] == 1.0
    assert "| step time, steady (s, median) | 2.00 (n=3) |" in bench.table([row])
