"""Deliberate bugs and the tests that must catch them (run by hand, not in CI).

  python tests/mutants.py                  # every mutation
  python tests/mutants.py gelu roberta     # those whose name contains a word
  python tests/mutants.py --list           # the table of mutations, nothing run
  python tests/mutants.py --baseline REV   # also: do the same tests as of commit REV
                                           # catch it (did the old suite miss it?);
                                           # new tests fall back to the old file
  python tests/mutants.py --baseline REV --whole-files   # the whole old files

Each `Mutation` replaces one exact piece of source text (it must occur exactly once)
and names the pytest node ids expected to catch it. The script copies the working
tree (git's tracked and untracked-but-not-ignored files) to a temporary folder,
checks that the named tests pass there unmutated, then for each mutation edits the
copy, runs the named tests against it (``PYTHONPATH`` puts the copy's ``atm_jax``
ahead of the installed one, which is verified), and restores the file, checking
its bytes. The working tree itself is never written. A mutation of a file with
uncommitted changes is refused (its ``old`` text may be mid-edit) unless
``--allow-dirty``. Prints mutation -> caught / SURVIVED per row; exits 1 if any
survived.

Named ``mutants.py`` (not ``test_*.py``) so pytest never collects it.

Adding mutations: append a list to `GROUPS` (one per area, e.g. ``"merge"``); a
mutation needs a unique ``name``, the repo-relative ``file``, ``old`` / ``new`` text
and the ``tests`` node ids.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutation:
    """One deliberate bug.

    Attributes:
        name: short unique id.
        file: path relative to the repository root.
        old: exact source text to replace; must occur exactly once in ``file``.
        new: its replacement.
        tests: pytest node ids (``tests/test_x.py::test_y[param]``) expected to fail.
        note: what the bug means, for the table.
    """

    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    note: str = ""


HF = "tests/test_hf_models.py::"
REMOTE = "tests/test_remote_workdir.py::"
FT = "tests/test_finetune.py::"
DATA = "tests/test_data.py::"
PAPER = "tests/test_paper_data.py::"

HF_MUTATIONS = [
    Mutation("bert-gelu-tanh", "atm_jax/models/bert.py",
             '"gelu": lambda x: jax.nn.gelu(x, approximate=False),',
             '"gelu": lambda x: jax.nn.gelu(x, approximate=True),',
             (HF + "test_encoder_matches_pytorch",), "exact GELU computed in its tanh form"),
    Mutation("bert-ln-eps-1e-5", "atm_jax/models/bert.py",
             'eps=float(s["layer_norm_eps"]),', "eps=1e-5,",
             (HF + "test_encoder_matches_pytorch[bert]",), "config eps ignored (BERT's is 1e-12)"),
    Mutation("bert-ln-eps-1e-12", "atm_jax/models/bert.py",
             'eps=float(s["layer_norm_eps"]),', "eps=1e-12,",
             (HF + "test_encoder_matches_pytorch[roberta]",),
             "config eps ignored (RoBERTa's is 1e-5)"),
    Mutation("roberta-no-position-offset", "atm_jax/models/bert.py",
             "position_ids = jnp.cumsum(real, axis=-1) * real + self.pad_token_id",
             "position_ids = jnp.cumsum(real, axis=-1) * real",
             (HF + "test_encoder_matches_pytorch[roberta]",), "positions not from padding_idx+1"),
    Mutation("roberta-padding-position", "atm_jax/models/bert.py",
             "position_ids = jnp.cumsum(real, axis=-1) * real + self.pad_token_id",
             "position_ids = jnp.cumsum(real, axis=-1) + self.pad_token_id",
             (HF + "test_encoder_matches_pytorch[roberta]",),
             "padding tokens not given the padding position"),
    Mutation("roberta-positions-like-bert", "atm_jax/models/bert.py",
             'if self.family == "roberta":', "if False:",
             (HF + "test_encoder_matches_pytorch[roberta]",), "RoBERTa counts positions 0, 1, ..."),
    Mutation("roberta-token-type-row-dropped", "atm_jax/models/bert.py",
             'x = x + table(self.type_vocab_size, "token_type_embeddings")(token_type_ids)',
             'x = x + (table(self.type_vocab_size, "token_type_embeddings")(token_type_ids)\n'
             '                 if self.type_vocab_size > 1 else 0)',
             (HF + "test_encoder_matches_pytorch[roberta]",),
             "one token type (RoBERTa) taken as none: its embedding row not added"),
    Mutation("bert-attention-unscaled", "atm_jax/models/bert.py",
             'heads("value"), mask=mask)', 'heads("value"), mask=mask, scale=1.0)',
             (HF + "test_encoder_matches_pytorch",), "no 1/sqrt(head_dim) in attention"),
    Mutation("clip-quick-gelu-as-gelu", "atm_jax/models/clip.py",
             '"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),',
             '"quick_gelu": lambda x: jax.nn.gelu(x, approximate=False),',
             (HF + "test_clip_matches_pytorch",), "OpenAI's quick GELU replaced by GELU"),
    Mutation("clip-text-ln-eps", "atm_jax/models/clip.py",
             'eps=float(t["layer_norm_eps"]),', "eps=1e-12,",
             (HF + "test_clip_matches_pytorch",), "text tower ignores its LayerNorm eps"),
    Mutation("hf-unexpected-silent", "atm_jax/models/hf.py",
             "    if extra:", "    if False:",
             (HF + "test_unexpected_encoder_tensors_are_named_in_a_warning",),
             "extra encoder tensors dropped without a warning"),
    Mutation("hf-stale-index-kept", "atm_jax/models/hf.py",
             "(folder / SAFETENSORS_INDEX).unlink(missing_ok=True)", "pass",
             (HF + "test_export_removes_a_stale_shard_index",),
             "export leaves an old shard index that wins on load"),
    Mutation("hf-lightning-ignored", "atm_jax/models/hf.py",
             'state = state["state_dict"]  # Lightning-style .ckpt.', "pass",
             (HF + "test_lightning_and_sharded_pickles_load_when_allowed",),
             "Lightning .ckpt read at the top level"),
    Mutation("hf-pickle-index-ignored", "atm_jax/models/hf.py",
             'index = folder / "pytorch_model.bin.index.json"\n    if index.is_file():',
             'index = folder / "pytorch_model.bin.index.json"\n    if False:',
             (HF + "test_lightning_and_sharded_pickles_load_when_allowed",),
             "sharded .bin index ignored: every .bin read"),
    Mutation("hf-offline-ignored", "atm_jax/models/hf.py",
             "local_files_only=files.offline(),", "local_files_only=False,",
             (HF + "test_hub_id_resolves_through_the_hub_client",),
             "offline flag not passed to the hub client"),
    Mutation("hf-no-config-check", "atm_jax/models/hf.py",
             "    if not config_path.is_file():", "    if False:",
             (HF + "test_folder_without_config_or_weights_says_which",),
             "missing config.json gives a bare OSError"),
]

FINETUNE_MUTATIONS = [
    Mutation("adamw-no-decay", "atm_jax/optim.py",
             "optax.adamw(lr, weight_decay=cfg.weight_decay)", "optax.adamw(lr, weight_decay=0.0)",
             (FT + "test_weight_decay_one_step_by_hand[adamw]",
              FT + "test_weight_decay_shrinks_untouched_weights_and_spares_a_frozen_head"),
             "AdamW's decay dropped"),
    Mutation("l2-decay-off", "atm_jax/optim.py",
             "if cfg.weight_decay > 0:", "if False:",
             (FT + "test_weight_decay_one_step_by_hand[adam]",
              FT + "test_weight_decay_one_step_by_hand[sgd]"),
             "Adam/SGD L2 decay dropped"),
    Mutation("adamw-decay-coupled", "atm_jax/optim.py",
             'if cfg.name == "adamw":', 'if False:',
             (FT + "test_weight_decay_one_step_by_hand[adamw]",),
             "AdamW's decay applied as L2 on the gradient (Adam + L2)"),
    Mutation("padding-counted", "atm_jax/batching.py",
             "mask = np.concatenate([np.ones(num_examples, np.float32), "
             "np.zeros(padding, np.float32)])",
             "mask = np.ones(num_examples + padding, np.float32)",
             (FT + "test_epochs_use_every_example_once_and_padding_adds_nothing",),
             "padding rows of the last batch trained on"),
    Mutation("same-shuffle-every-epoch", "atm_jax/finetune.py",
             "order = epoch_order(key, epoch, len(inputs))",
             "order = epoch_order(key, 0, len(inputs))",
             (FT + "test_epochs_visit_the_examples_in_different_orders",),
             "every epoch uses epoch 0's order"),
    Mutation("epoch-order-ignores-epoch", "atm_jax/finetune.py",
             "seed = np.asarray(jax.random.key_data(jax.random.fold_in(key, epoch))).ravel()",
             "seed = np.asarray(jax.random.key_data(key)).ravel()",
             (FT + "test_epochs_visit_the_examples_in_different_orders",),
             "epoch_order draws one permutation for every epoch"),
    Mutation("on-epoch-not-called", "atm_jax/finetune.py",
             "                    on_epoch(epoch, epoch_metrics)\n",
             "                    pass\n",
             (FT + "test_epochs_use_every_example_once_and_padding_adds_nothing",),
             "on_epoch callback never called"),
    Mutation("epoch-loss-unweighted", "atm_jax/finetune.py",
             '"loss": float((losses * counts).sum() / counts.sum()),',
             '"loss": float(losses.mean()),',
             (FT + "test_epochs_use_every_example_once_and_padding_adds_nothing",),
             "epoch loss = mean of step losses (short last batch over-weighted)"),
    Mutation("epoch-accuracy-over-padded-rows", "atm_jax/finetune.py",
             '"accuracy": correct / len(inputs),',
             '"accuracy": correct / (len(losses) * self.opt.batch_size),',
             (FT + "test_epochs_use_every_example_once_and_padding_adds_nothing",),
             "epoch accuracy divided by padded row count"),
    Mutation("augment-not-applied", "atm_jax/finetune.py",
             'inputs = batch["inputs"] if augment is None else augment(batch["inputs"], '
             'batch["key"])',
             'inputs = batch["inputs"]',
             (FT + "test_augment_transforms_every_training_batch",), "augment never called"),
    Mutation("augment-same-key", "atm_jax/finetune.py",
             'batch["key"] = jax.random.fold_in(epoch_key, i)', 'batch["key"] = epoch_key',
             (FT + "test_augment_gets_a_distinct_reproducible_key_per_step",),
             "every step of an epoch augments with one key"),
    Mutation("augment-key-is-shuffle-key", "atm_jax/finetune.py",
             "epoch_key = jax.random.fold_in(jax.random.fold_in(key, epoch), 1)",
             "epoch_key = jax.random.fold_in(key, epoch)",
             (FT + "test_augment_keys_follow_the_documented_derivation",),
             "augment keys derived from the shuffle's key (streams not kept apart)"),
]

DATA_MUTATIONS = [
    Mutation("head-init-unscaled", "atm_jax/models/heads.py",
             '"kernel": kernel / jnp.sqrt(jnp.float32(in_features)),', '"kernel": kernel,',
             (PAPER + "test_glue_head_is_fixed_and_frozen_shape",),
             "GLUE heads drawn at std 1, not LeCun 1/sqrt(F)"),
    Mutation("glyph-masters-uncached", "atm_jax/data/glyphs.py",
             "@functools.lru_cache(maxsize=4)\ndef glyph_masters(", "def glyph_masters(",
             (DATA + "test_glyphs_draw_fonts_once_and_warp_in_chunks",),
             "font masters redrawn on every render"),
    Mutation("glyph-warp-per-image", "atm_jax/data/glyphs.py",
             "_CHUNK = 4096", "_CHUNK = 1",
             (DATA + "test_glyphs_draw_fonts_once_and_warp_in_chunks",),
             "images warped one by one"),
    Mutation("split-rounding-truncates", "atm_jax/data/mini.py",
             "round(fraction * len(labels))", "int(fraction * len(labels))",
             (DATA + "test_split_rules_give_the_real_counts_offline",),
             "carved split sizes truncated instead of rounded"),
    Mutation("pretrain-cache-ignored", "atm_jax/pretrain.py",
             "if params_path.exists() and info_path.exists():", "if False:",
             ("tests/test_pretrain.py::test_pretrain_runs_caches_and_reloads_identically",),
             "cached base retrained every time"),
]

# One list per area; other areas append theirs here.
ATM = "tests/test_atm.py::"
RUN = "tests/test_runner.py::"
FILES = "tests/test_files.py::"
STRUCT = "tests/test_structure.py::"

ATM_MUTATIONS = [
    Mutation("atm-task-key-order", "atm_jax/atm.py",
             "jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, iteration), 0), task_index)",
             "jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, task_index), 0), iteration)",
             (ATM + "test_atm_loop_equals_the_closed_form",),
             "task keys derived against their documentation"),
    Mutation("atm-heads-not-carried", "atm_jax/atm.py",
             "heads = dict(state.finetuned_heads) if carry_heads else state.heads",
             "heads = state.heads",
             (ATM + "test_carried_heads_are_the_previous_iterations_heads_exactly",),
             "trainable heads reset every iteration"),
    Mutation("one-shot-individual-base-head", "atm_jax/atm.py",
             "_evaluated(evaluate, params, {task: state.finetuned_heads[task]},",
             "_evaluated(evaluate, params, {task: state.heads[task]},",
             (ATM + "test_one_shot_individual_and_merged_params_by_hand",),
             "individual models scored with their starting heads"),
    Mutation("merge-include-ignored", "atm_jax/merge_spec.py",
             "return tree_lib.path_filter(spec.include, spec.exclude, collections=spec.collections)",
             "return tree_lib.path_filter(None, spec.exclude, collections=spec.collections)",
             (ATM + "test_include_merges_only_matching_leaves",), "MergeSpec.include dropped"),
    Mutation("merge-collections-ignored", "atm_jax/merge_spec.py",
             "return tree_lib.path_filter(spec.include, spec.exclude, collections=spec.collections)",
             "return tree_lib.path_filter(spec.include, spec.exclude, collections=None)",
             (ATM + "test_only_the_params_collection_merges_by_default",),
             "BatchNorm statistics merged as if weights"),
    Mutation("valft-on-train", "atm_jax/runner.py",
             "state = self.finetune_all(name, state, spec.split, epochs, with_base=True,",
             'state = self.finetune_all(name, state, "train", epochs, with_base=True,',
             (RUN + "test_valft_trains_on_the_validation_split_and_save_params_off_writes_none",),
             "valFT ATM trains on the training split"),
    Mutation("save-params-ignored", "atm_jax/runner.py",
             "self.finish_unit(\"one_shot\", params if config.save_params else None)",
             "self.finish_unit(\"one_shot\", params)",
             (RUN + "test_valft_trains_on_the_validation_split_and_save_params_off_writes_none",),
             "save_params=False still writes params"),
    Mutation("resume-drops-finetuned-heads", "atm_jax/checkpoint.py",
             'finetuned_heads=order(arrays.get("finetuned_heads", {})),', "finetuned_heads={},",
             (RUN + "test_trainable_heads_are_checkpointed_and_resumed_exactly",),
             "a resumed iteration forgets the heads its finished tasks trained"),
    Mutation("checkpoint-without-host-copy", "atm_jax/checkpoint.py",
             "        state = host_copy(state) if self._writer else savable(state)",
             "        state = savable(state)",
             ("tests/test_resume.py::test_background_writes_return_at_once_keep_their_order_"
              "and_the_values_of_the_call",),
             "a background checkpoint writes arrays the run changed after asking for it"),
    Mutation("checkpoint-writes-after-failure", "atm_jax/checkpoint.py",
             "            if self._failed is not None:  # a step must not land without its items",
             "            if False:",
             ("tests/test_resume.py::test_a_failed_background_write_is_raised_and_no_later_"
              "write_lands",),
             "a step lands on disk naming an item whose write failed"),
    Mutation("seed-change-accepted", "atm_jax/runner.py",
             'if not np.array_equal(np.asarray(restored.state["key"]), self.key_data):',
             "if False:",
             (RUN + "test_resume_refuses_a_seed_change_even_when_forced",),
             "a forced resume silently changes the seed midway"),
    Mutation("resume-ignores-field-defaults", "atm_jax/workdir.py",
             "        elif a is ABSENT and b in _defaults_of(path, defaults):\n            continue\n",
             "",
             ("tests/test_resume.py::test_a_workdir_from_before_a_field_existed_resumes",
              "tests/test_resume.py::test_fields_added_since_a_workdir_was_written_count_only_"
              "when_not_at_their_default"),
             "a field added by an upgrade makes every older workdir 'another config'"),
    Mutation("normalized-by-itself", "atm_jax/results.py",
             'normalized_average(row["accuracy"], individual)',
             "normalized_average(individual, individual)",
             (RUN + "test_main_end_to_end_on_tiny_data",), "every row normalized to 1"),
    Mutation("duplicate-tasks-accepted", "atm_jax/schema.py",
             "if len(set(tasks)) != len(tasks):", "if False:",
             (RUN + "test_bad_configs_fail_before_any_compute",), "config.tasks may name a task twice"),
    Mutation("write-in-place", "atm_jax/files.py", "            write(tmp)\n",
             "            write(os.fspath(target))\n",
             (FILES + "test_a_failed_write_keeps_the_old_file_and_no_temp",),
             "a failed write leaves half a file"),
    Mutation("bucket-append", "atm_jax/writers.py", "if not files.is_local(self.path):", "if False:",
             (FILES + "test_metrics_on_a_bucket_are_rewritten_whole",),
             "metrics.jsonl appended on an object store"),
    Mutation("checkpoint-bucket-made-local", "atm_jax/checkpoint.py",
             "    return path.absolute() if files.is_local(path) else path",
             "    return path.absolute()",
             (REMOTE + "test_checkpoints_on_a_bucket_delete_unnamed_items_and_set_damaged_steps_aside",
              REMOTE + "test_a_refused_checkpoint_array_write_stops_the_run"),
             "a gs:// checkpoint folder taken for a local one (written under the current folder)"),
    Mutation("checkpoint-bucket-items-kept", "atm_jax/checkpoint.py",
             "                    path.rmtree()\n", "                    pass\n",
             (REMOTE + "test_checkpoints_on_a_bucket_delete_unnamed_items_and_set_damaged_steps_aside",),
             "finetuned-model items no kept step names are never deleted"),
    Mutation("checkpoint-bucket-no-aside-folder", "atm_jax/checkpoint.py",
             "        if not files.is_local(aside):", "        if False:",
             (REMOTE + "test_checkpoints_on_a_bucket_delete_unnamed_items_and_set_damaged_steps_aside",),
             "a damaged step on a bucket cannot be moved aside (no such folder): resume fails"),
    Mutation("every-process-writes", "atm_jax/files.py",
             "if not (all_processes or is_writer()):", "if False:",
             (FILES + "test_only_process_zero_writes_unless_all_processes",),
             "processes other than 0 write shared files"),
    Mutation("import-cycle", "atm_jax/schema.py", "from atm_jax import files, recipes, sharding\n",
             "from atm_jax import files, recipes, runner, sharding  # noqa: F401\n",
             (STRUCT + "test_no_import_cycle_in_the_package",), "schema <-> runner cycle"),
]

CLOSURES = "tests/test_atm_closures.py::"
NNX = "tests/test_nnx.py::"
SHAPES = "tests/test_tree_shapes.py::"

# Inputs the library meets in research code: NNX state, list-topped params, low
# precision, closures handed to the ATM loop, PRNG keys.
EDGE_MUTATIONS = [
    Mutation("closures-no-tree-check", "atm_jax/closures.py",
             '        checks.check_compatible([base, params], names=["the base", "its params tree"],\n'
             '                                what="params tree")\n',
             "        pass\n",
             (CLOSURES + "test_a_wrong_first_finetune_fails_before_the_second_task[structure]",
              CLOSURES + "test_a_later_task_is_named_and_stops_the_iteration_there",
              CLOSURES + "test_the_pa_atm_hook_checks_each_finetune_as_it_returns"),
             "finetuned params not compared with the base: a wrong tree surfaces at the merge"),
    Mutation("atm-finetune-unchecked", "atm_jax/atm.py",
             "    params, head, metrics = closures.finetune_result(\n"
             "        out, state.base, task=task, closure=closure,\n"
             '        where=f"{name}, iteration {state.iteration + 1}")\n',
             "    params, head, metrics = out\n",
             (CLOSURES + "test_a_wrong_first_finetune_fails_before_the_second_task[shape]",
              CLOSURES + "test_one_shot_fails_on_the_first_wrong_finetune"),
             "the ATM loop appends finetune results unchecked"),
    Mutation("pa-hook-unchecked", "atm_jax/distributed.py",
             "                mine[t] = closures.finetune_result(finetune(base, heads[t], t, epochs, "
             "keys[t]),\n                                                   base, task=t)\n",
             "                mine[t] = finetune(base, heads[t], t, epochs, keys[t])\n",
             (CLOSURES + "test_the_pa_atm_hook_checks_each_finetune_as_it_returns",),
             "PA-ATM finetunes all its tasks (and gathers) before any check"),
    Mutation("evaluate-bare-float", "atm_jax/atm.py",
             "return {t: closures.accuracy(acc[t], task=t, what=what) for t in heads}",
             "return {t: float(acc[t]) for t in heads}",
             (CLOSURES + "test_a_wrong_first_evaluate_fails_before_any_finetune[numpy-shape1]",
              CLOSURES + "test_one_shot_fails_on_the_first_wrong_evaluate"),
             "accuracies through bare float(): errors name neither evaluate nor the task"),
    Mutation("accuracy-bool", "atm_jax/closures.py",
             '    if not _is_bool(value) and hasattr(value, "__float__") \\\n',
             '    if hasattr(value, "__float__") \\\n',
             (CLOSURES + "test_a_wrong_first_evaluate_fails_before_any_finetune[bool]",),
             "a bool accepted as accuracy 1.0"),
    Mutation("dare-key-unchecked", "atm_jax/checks.py",
             '    raise TypeError(f"merge {name!r} needs one PRNG key',
             '    return\n    raise TypeError(f"merge {name!r} needs one PRNG key',
             (CLOSURES + "test_dare_refuses_what_is_not_one_key[dare-int]",),
             "DARE's key not type-checked (JAX's internal PRNG error)"),
    Mutation("dare-key-raw-shape", "atm_jax/checks.py",
             "        if dtype == np.uint32 and shape == raw:", "        if dtype == np.uint32:",
             (CLOSURES + "test_dare_refuses_what_is_not_one_key[dare-uint32-shape3]",),
             "raw keys of any shape accepted"),
    Mutation("nnx-value-in-paths", "atm_jax/checks.py",
             '    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":',
             "    if False:",
             (NNX + "test_leaf_paths_and_anchored_filters_match_linen_dicts",),
             "NNX leaf paths end in /value: an anchored head filter matches nothing"),
    Mutation("nnx-batch-stats-not-state", "atm_jax/checks.py",
             '                or kinds.get(path, "params") != "params"):', "                or False):",
             (NNX + "test_batch_stats_and_other_non_param_variables_warn_when_merged",),
             "merging nnx.BatchStat raises no StateMergeWarning"),
    Mutation("nnx-rng-accepted", "atm_jax/checks.py",
             "    if rng:\n        raise ValueError(f\"Leaf {rng[0]!r}", "    if False:\n        raise ValueError(f\"Leaf {rng[0]!r}",
             (NNX + "test_rng_state_is_refused_with_the_param_split_shown",),
             "NNX RNG keys reach the merge (JAX's dtype error, no nnx.split hint)"),
    Mutation("nnx-split-ignores-variable-type", "atm_jax/tree.py",
             "        if path in kinds and kinds[path] not in collections:\n            return False\n",
             "",
             (NNX + "test_atm_run_on_a_full_nnx_state[collections0]",),
             "a full nnx.state merges its batch statistics and RNG state by default"),
    Mutation("checkpoint-nnx-variables-kept", "atm_jax/checkpoint.py",
             "        state = plain(dict(state))\n", "        state = dict(state)\n",
             (NNX + "test_checkpoint_round_trip_keeps_the_nnx_structure",),
             "an nnx.State saved with its Variables: CRC keys differ on restore, step set aside"),
    Mutation("list-of-trees-accepted", "atm_jax/checks.py",
             "    if type(obj) not in (list, tuple) or not obj:\n        return False",
             "    if True:\n        return False",
             (SHAPES + "test_a_sequence_of_task_trees_is_refused_whatever_their_containers[list-list]",
              SHAPES + "test_a_stacked_tree_may_have_any_container_at_its_top[list]"),
             "a list of T trees (any container) merged over the wrong axis"),
    Mutation("atm-merge-without-like", "atm_jax/merge_spec.py",
             '    if "like" in info.options:\n        kwargs["like"] = selected_base\n',
             "",
             (SHAPES + "test_atm_merges_per_layer_list_params",),
             "ATM's merge step refuses per-layer list params"),
    Mutation("apply-low-precision-rounds-twice", "atm_jax/tree.py",
             "    narrow = jnp.finfo(dtype).bits < 32 and jnp.finfo(d.dtype).nmant <= 11\n",
             "    narrow = False\n",
             (SHAPES + "test_apply_rounds_low_precision_params_once[0.7-bfloat16]",),
             "bf16 apply: float32 sum then a cast (double rounding near midpoints)"),
    Mutation("apply-rounded-product", "atm_jax/tree.py",
             "        result = total + error\n", "        result = plain\n",
             (SHAPES + "test_apply_float32_is_within_one_ulp_of_the_exact_value",),
             "float32 apply rounds scale * delta before the add (cancellations lose digits)"),
]

GRAD = "tests/test_merge_grad.py::"

GRAD_MUTATIONS = [
    Mutation("select-threshold-differentiated", "atm_jax/select.py",
             "    leaves = [jax.lax.stop_gradient(x) if isinstance(x, jax.core.Tracer) else x "
             "for x in leaves]",
             "    leaves = [x for x in leaves]",
             (GRAD + "test_grad_matches_finite_differences[ties-auto-eager]",
              GRAD + "test_grad_matches_finite_differences[ties-auto-jit]"),
             "the host selection is differentiated: grad through TIES on CPU fails"),
    Mutation("ties-agreeing-values-no-gradient", "atm_jax/merge/sparsify.py",
             "            total = total + jnp.where(chosen, k, 0)",
             "            total = total + jnp.where(chosen, jax.lax.stop_gradient(k), 0)",
             (GRAD + "test_grad_matches_finite_differences[ties-top_k-eager]",),
             "the disjoint mean passes no gradient to the agreeing values (forward unchanged)"),
    Mutation("sparsify-kept-values-no-gradient", "atm_jax/merge/sparsify.py",
             "            xt = jnp.where(m, xt, jnp.zeros_like(xt))",
             "            xt = jnp.where(m, jax.lax.stop_gradient(xt), jnp.zeros_like(xt))",
             (GRAD + "test_grad_matches_finite_differences[breadcrumbs-bisect-eager]",),
             "kept entries pass no gradient (forward unchanged)"),
    Mutation("host-error-blames-jit-alone", "atm_jax/select.py",
             "eager jax.grad and jax.jvp are \"\n                         \"fine); ",
             "\"\n                         \"",
             (GRAD + "test_host_method_under_jit_grad_names_the_methods_that_work",),
             "the host method's error no longer says that eager grad works"),
]

EVENTS = "tests/test_event_files.py::"

EVENT_MUTATIONS = [
    Mutation("events-steps-written-again", "atm_jax/event_files.py",
             "if (run, tag, step) not in self.written]", "if True]",
             (EVENTS + "test_each_record_is_readable_at_once_and_a_resumed_writer_skips_written_steps[local]",
              EVENTS + "test_a_run_stopped_between_a_record_and_its_checkpoint_writes_no_step_twice[local]"),
             "a resumed run writes the steps already in the event files again"),
    Mutation("events-not-flushed", "atm_jax/event_files.py",
             "            writer.flush()\n", "",
             (EVENTS + "test_each_record_is_readable_at_once_and_a_resumed_writer_skips_written_steps[local]",
              EVENTS + "test_tensorboard_shows_the_curves_while_the_run_goes[local]"),
             "events reach the file only when it is closed: TensorBoard shows nothing live"),
    Mutation("events-remote-upload-drops-earlier-bytes", "atm_jax/event_files.py",
             "            files.write_bytes(self.path, bytes(self.data), all_processes=True)\n",
             "            files.write_bytes(self.path, bytes(self.data), all_processes=True)\n"
             "            self.data = bytearray()\n",
             (EVENTS + "test_each_record_is_readable_at_once_and_a_resumed_writer_skips_written_steps"
              "[mock_bucket]",
              EVENTS + "test_each_record_is_readable_at_once_and_a_resumed_writer_skips_written_steps"
              "[gcs]",
              EVENTS + "test_tensorboard_shows_the_curves_while_the_run_goes[gcs]"),
             "a bucket's event file holds only the last flush's events"),
    Mutation("events-failure-raised", "atm_jax/event_files.py",
             "        except Exception as e:  # noqa: BLE001 - any failure of an event write",
             "        except ZeroDivisionError as e:",
             (EVENTS + "test_a_failing_write_warns_once_and_the_writer_goes_quiet",
              EVENTS + "test_a_failing_event_write_warns_once_and_the_run_finishes"),
             "a failing event write stops the run"),
    Mutation("events-warn-every-failure", "atm_jax/event_files.py",
             "            self.active = False\n            self.failure",
             "            self.failure",
             (EVENTS + "test_a_failing_write_warns_once_and_the_writer_goes_quiet",
              EVENTS + "test_a_failing_event_write_warns_once_and_the_run_finishes",
              EVENTS + "test_a_write_the_bucket_refuses_warns_once"),
             "every record after a failed write tries again and warns again"),
    Mutation("events-torn-record-read", "atm_jax/event_files.py",
             "\n                or end > len(blob)):", "):",
             (EVENTS + "test_a_torn_last_record_is_dropped_and_the_next_writer_writes_its_step",),
             "the reader parses a killed writer's half record"),
    Mutation("analysis-deletes-live-events", "atm_jax/analysis/tensorboard.py",
             "    path = files.as_path(folder) / RUN\n",
             "    files.as_path(folder).rmtree(missing_ok=True)\n    path = files.as_path(folder) / RUN\n",
             ("tests/test_analysis.py::test_analysis_of_a_tiny_run",),
             "the analysis report deletes the runs written live"),
    Mutation("analysis-accuracy-of-every-line", "atm_jax/analysis/tensorboard.py",
             "            if \"accuracy\" not in line:\n                continue\n", "",
             ("tests/test_analysis.py::test_analysis_of_a_tiny_run",),
             "the analysis report fails on a metrics line without an accuracy"),
]

MERGE_DATA_MUTATIONS = [
    Mutation("regmean-ignores-off-diagonal-scale", "atm_jax/merge/statistics.py",
             "    shrink = scale + (1.0 - scale) * eye", "    shrink = 1.0 + 0.0 * eye",
             ["tests/test_merge_data.py::test_regmean_below_one_matches_the_scaled_closed_form[0.5]"],
             "RegMean's off-diagonal scale never applied"),
    Mutation("regmean-pp-no-propagation", "atm_jax/merge/statistics.py",
             "            params = model([t if isinstance(c, str) else c for c in choice])",
             "            params = model([t for c in choice])",
             ["tests/test_merge_data.py::test_regmean_pp_propagates_through_the_merged_first_layer"],
             "RegMean++ captures with each task's own earlier layers (plain RegMean)"),
    Mutation("grams-keep-padding", "atm_jax/capture.py",
             "                g = g + jnp.matmul((flat * w[:, None]).T, flat,",
             "                g = g + jnp.matmul(flat.T, flat,",
             ["tests/test_merge_data.py::test_input_grams_mask_padding_and_tokens"],
             "padded rows and tokens counted in the Grams"),
    Mutation("merge-data-last-examples", "atm_jax/runner.py",
             "inputs={t: x[:n] for t, (x, _) in train.items()}",
             "inputs={t: x[-n:] for t, (x, _) in train.items()}",
             ["tests/test_study_rows.py::test_data_merges_see_the_first_examples_of_each_task_every_iteration"],
             "the statistics see other examples than the documented first ones"),
]

GROUPS: dict[str, list[Mutation]] = {
    "hf": HF_MUTATIONS,
    "finetune": FINETUNE_MUTATIONS,
    "data": DATA_MUTATIONS,
    "atm": ATM_MUTATIONS,
    "edges": EDGE_MUTATIONS,
    "grad": GRAD_MUTATIONS,
    "events": EVENT_MUTATIONS,
    "merge_data": MERGE_DATA_MUTATIONS,
}


def all_mutations() -> list[Mutation]:
    out = [m for group in GROUPS.values() for m in group]
    names = [m.name for m in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"mutation names must be unique; repeated: {duplicates}")
    return out


# ---------------------------------------------------------------------------
# Running.


def _git(*args: str, cwd: pathlib.Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout


def _copy_tree(dest: pathlib.Path) -> None:
    """Copies git's tracked and untracked-but-not-ignored files (as they are now)."""
    listing = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard")
    for name in filter(None, listing.split("\0")):
        source = ROOT / name
        if source.is_file():  # deleted-but-tracked files are skipped.
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _env(copy: pathlib.Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(copy), env.get("PYTHONPATH")]))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _check_import(copy: pathlib.Path) -> None:
    out = subprocess.run([sys.executable, "-c", "import atm_jax; print(atm_jax.__file__)"],
                         cwd=copy, env=_env(copy), capture_output=True, text=True, check=True)
    if not pathlib.Path(out.stdout.strip()).resolve().is_relative_to(copy.resolve()):
        raise RuntimeError(f"atm_jax imports from {out.stdout.strip()}, not the copy {copy}")


def _failures(copy: pathlib.Path, targets: list[str], timeout: float,
              extra: tuple[str, ...] = ()) -> tuple[int, set[str]]:
    """Runs pytest on ``targets`` in the copy.

    Returns:
        (exit code, names of the failed tests as ``module.py::test[param]``).
    """
    report = copy / ".mutants-report.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
               f"--junitxml={report}", "-o", "junit_family=xunit1", *extra, *targets]
    try:
        rc = subprocess.run(command, cwd=copy, env=_env(copy), capture_output=True, check=False,
                            timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return -1, set()
    failed = set()
    if report.exists():
        for case in ET.parse(report).iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                module = case.get("classname").rpartition(".")[2]
                failed.add(f"{module}.py::{case.get('name')}")
        report.unlink()
    return rc, failed


def _base(test: str) -> str:
    """``tests/test_x.py::test_y[p]`` -> ``test_x.py::test_y`` (comparable across runs)."""
    return pathlib.Path(test.split("[")[0]).name


def _dirty(file: str) -> bool:
    return bool(_git("status", "--porcelain", "--", file).strip())


def _apply(copy: pathlib.Path, mutation: Mutation) -> tuple[pathlib.Path, bytes] | str:
    path = copy / mutation.file
    if not path.is_file():
        return "stale (no such file)"
    original = path.read_bytes()
    count = original.decode().count(mutation.old)
    if count != 1:
        return f"stale (old text found {count}x)"
    path.write_text(original.decode().replace(mutation.old, mutation.new))
    return path, original


def _restore(path: pathlib.Path, original: bytes) -> None:
    path.write_bytes(original)
    if hashlib.sha256(path.read_bytes()).digest() != hashlib.sha256(original).digest():
        raise RuntimeError(f"could not restore {path}; stopping")


def _old_targets(old_tests: pathlib.Path, tests: tuple[str, ...], whole_files: bool
                 ) -> list[str]:
    """The old suite's counterparts of ``tests``: the same test where the old file
    has it (unless ``whole_files``), else the whole old file."""
    out = []
    for test in tests:
        file, _, name = test.partition("::")
        old_file = old_tests / pathlib.Path(file).name
        if not old_file.exists():
            continue
        function = name.split("[")[0]
        same = name and f"def {function}(" in old_file.read_text()
        out.append(f"{old_file}::{name}" if same and not whole_files else str(old_file))
    return sorted(set(out))


def _baseline_tests(rev: str, dest: pathlib.Path) -> pathlib.Path:
    """The tests/ folder of commit ``rev``, extracted under ``dest``."""
    dest.mkdir(parents=True)
    archive = dest / "tests.tar"
    with archive.open("wb") as f:
        subprocess.run(["git", "archive", rev, "tests"], cwd=ROOT, stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest / "tests"


def run(mutations: list[Mutation], *, baseline: str | None, allow_dirty: bool,
        timeout: float, whole_files: bool = False) -> int:
    with tempfile.TemporaryDirectory(prefix="atm_mutants_") as tmp:
        copy = pathlib.Path(tmp) / "repo"
        _copy_tree(copy)
        _check_import(copy)
        targets = sorted({t for m in mutations for t in m.tests})
        rc, broken = _failures(copy, targets, timeout)
        if rc not in (0, 1):
            print(f"the named tests do not run cleanly unmutated (pytest exit {rc})")
            return 2
        old_tests, deselect = None, ()
        if baseline:
            old_tests = _baseline_tests(baseline, pathlib.Path(tmp) / "baseline")
            files = sorted({t.split("::")[0] for m in mutations for t in m.tests})
            old_targets = [str(old_tests / pathlib.Path(f).name) for f in files
                           if (old_tests / pathlib.Path(f).name).exists()]
            old_rc, old_clean = _failures(copy, old_targets, timeout)
            if old_rc not in (0, 1):  # e.g. the old files no longer import.
                print(f"tests@{baseline}: pytest exit {old_rc} unmutated; no baseline column")
                old_tests = None
            # Tests that already fail unmutated say nothing about a mutant.
            deselect = tuple(f"--deselect={old_tests}/{name}" for name in sorted(old_clean))
        rows, survived = [], 0
        for m in mutations:
            if not allow_dirty and _dirty(m.file):
                rows.append((m, "skipped (file has uncommitted changes)", ""))
                continue
            if any(_base(t) in {_base(b) for b in broken} for t in m.tests):
                rows.append((m, "invalid (a named test fails unmutated)", ""))
                continue
            applied = _apply(copy, m)
            if isinstance(applied, str):
                rows.append((m, applied, ""))
                continue
            path, original = applied
            try:
                rc, failed = _failures(copy, list(m.tests), timeout, ("-x",))
                if old_tests is not None:
                    targets = _old_targets(old_tests, m.tests, whole_files)
                    _, old_failed = (_failures(copy, targets, timeout, ("-x", *deselect))
                                     if targets else (0, set()))
                    old = "caught" if old_failed else "missed"
                else:
                    old = ""
            finally:
                _restore(path, original)
            if rc == 1 and failed:
                result = "caught"
            elif rc == 0:
                result, survived = "SURVIVED", survived + 1
            else:
                result = f"error (pytest exit {rc})"
            rows.append((m, result, old))
            print(f"{m.name}: {result} {old}".rstrip(), file=sys.stderr, flush=True)
    _print(rows, baseline)
    return 1 if survived else 0


def _print(rows, baseline: str | None) -> None:
    head = ["mutation", "file", "result"] + ([f"tests@{baseline[:8]}"] if baseline else [])
    table = [[m.name, m.file, result] + ([old] if baseline else []) for m, result, old in rows]
    widths = [max(len(str(r[i])) for r in [head, *table]) for i in range(len(head))]
    for row in [head, ["-" * w for w in widths], *table]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("words", nargs="*", help="run mutations whose name contains a word")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--baseline", metavar="REV",
                        help="also run the test files as of commit REV on each mutant")
    parser.add_argument("--whole-files", action="store_true",
                        help="baseline: run the whole old test files, not the same tests")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="mutate files with uncommitted changes too")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pytest run")
    args = parser.parse_args(argv)
    mutations = [m for m in all_mutations()
                 if not args.words or any(w in m.name for w in args.words)]
    if args.list:
        for m in mutations:
            print(f"{m.name:34} {m.file:28} {m.note}\n{'':34} caught by {', '.join(m.tests)}")
        return 0
    return run(mutations, baseline=args.baseline, allow_dirty=args.allow_dirty,
               timeout=args.timeout, whole_files=args.whole_files)


if __name__ == "__main__":
    sys.exit(main())
