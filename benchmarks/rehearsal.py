"""Full-size CPU rehearsal of the paper configs.

The real CLIP ViT-B/16 and BERT-base architectures, random init (no weights reach
this machine), go through the real runner path: ``python -m atm_jax.main
--config=configs/vit.py`` / ``configs/bert.py`` with ``--config.*`` overrides, in a
subprocess, for one full ATM iteration: every task finetuned (one-shot, ATM, and
valFT ATM for CLIP), merged with each one-shot merge (TA, TIES, Breadcrumbs, DARE
for BERT), evaluated, checkpointed and exported to Hugging Face. The seven paper
tasks are replaced by small generated stand-ins with the paper's names and class
counts (tests/rehearsal_data.py): image folders / GLUE-like TSVs read with
``--config.data.source=folder``. Then a second process loads every export with
transformers and compares its output with our Flax forward of the same merged
params, and reads the train step's FLOPs from XLA's cost analysis.

Measured: peak host memory of the run (the child's ru_maxrss), step time (the
runner's epochs timed by wrapping ``Finetuner.epoch_steps``; the first epoch of
each head shape includes compilation, so steady state is the median of the
rest), each merge (``atm.merge_step`` wrapped), each checkpoint save
(the step and item writes on the checkpoint thread), the export size and the HF round
trip. Projected: the paper's full runs on one H200 and on a TPU v4-8 (`project`).

Run::

  nice -n 10 python benchmarks/rehearsal.py --all          # both, writes benchmarks/results/
  python benchmarks/rehearsal.py --model bert --no-write   # one, a look only
  python benchmarks/rehearsal.py --model clip --tiny       # tiny shapes, seconds (machinery)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

sys.path.insert(0, str(common.ROOT / "tests"))  # the stand-ins are a test helper

CONFIGS = {"clip": "configs/vit.py", "bert": "configs/bert.py"}
BATCH = 8  # the full-size rows' batch, as the rehearsal was specified (the paper's: 32)
TRAIN_SIZE, TEST_SIZE, VALIDATION_CAP = 8, 8, 8  # one step per task and split
# Source split sizes of the real tasks (tfds catalog; GLUE test = validation, MNLI
# validation_matched; EuroSAT / RESISC45: the train-only source minus the fixed 10% /
# 20% test carve of atm_jax.data.paper; DTD: train+validation of fold 1; GTSRB: the
# official archives). (train source, test)
SOURCE_SIZES = {
    "cifar100": (50000, 10000), "dtd": (3760, 1880), "eurosat": (24300, 2700),
    "gtsrb": (26640, 12630), "mnist": (60000, 10000), "resisc45": (25200, 6300),
    "svhn": (73257, 26032),
    "cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668, 408), "qqp": (363846, 40430),
    "mnli": (392702, 9815), "qnli": (104743, 5463), "rte": (2490, 277),
}
# Peak dense bf16 FLOP/s: H200 SXM (NVIDIA datasheet), TPU v4-8 = 4 chips × 275 T.
ACCELERATORS = {"H200": 989e12, "TPU v4-8": 4 * 275e12}
MFUS = (0.3, 0.4)
EPOCHS, ITERATIONS = 10, 10  # the paper's budget and ATM iterations


def overrides(model: str, root: pathlib.Path, *, tiny: bool = False,
              test_size: int = TEST_SIZE) -> dict:
    """The ``--config.*`` values of the rehearsal (paths under ``root``)."""
    values = {
        "data.source": "folder", "data.folder": str(root / "data"),
        "data.train_size": TRAIN_SIZE, "data.test_size": test_size,
        "data.validation_cap": VALIDATION_CAP, "model.weights": str(root / "hf_init"),
        "optimizer.batch_size": BATCH, "eval_batch_size": test_size, "budget": 1,
        "methods.atm.iterations": 1, "checkpoint.keep": 2,
    }
    if model == "clip":
        values["methods.valft_atm.iterations"] = 1
        values["data.tokenizer"] = str(root / "prompt_tokenizer" / "tokenizer.json")
    else:
        values["data.tokenizer"] = str(root / "data" / "tokenizer")
        if tiny:
            values["data.max_length"] = 32
    return values


def flags(values: dict) -> list[str]:
    return [f"--config.{k}={tuple(v) if isinstance(v, (list, tuple)) else v}"
            for k, v in values.items()]


def prepare(model: str, root: pathlib.Path, *, tiny: bool = False, tasks=None,
            test_size: int = TEST_SIZE, text_layers: int = 12) -> dict:
    """Writes the random-init HF folder, the stand-in tasks and the tokenizer."""
    import rehearsal_data as rd

    if model == "clip":
        tasks = tuple(tasks or rd.VISION_TASKS)
        rd.write_image_tasks(root / "data", tasks, side=16 if tiny else 32)
        rd.write_prompt_tokenizer(root / "prompt_tokenizer" / "tokenizer.json", tasks)
    else:
        tasks = tuple(tasks or rd.GLUE_TASKS)
        rd.write_text_tasks(root / "data", tasks)
    # Fewer CLIP text layers (and a 32-token context: the longest prompt is 26) only
    # shorten the one-off zero-shot head encoding; the vision tower stays ViT-B/16.
    text = None if text_layers == 12 else {"num_hidden_layers": text_layers,
                                           "max_position_embeddings": 32}
    rd.write_hf_model(model, root / "hf_init", tiny=tiny,
                      text_config=text if model == "clip" else None)
    values = overrides(model, root, tiny=tiny, test_size=test_size)
    if tasks is not None:
        values["tasks"] = list(tasks)
    return values


# -- the run, instrumented --------------------------------------------------------------


def child_run(out: str, argv: list[str]) -> None:
    """``python -m atm_jax.main ARGV`` with the runner's epochs, merges and checkpoint
    saves timed; the timings go to ``out`` as JSON (also when the run fails)."""
    from absl import app

    from atm_jax import atm, checkpoint, finetune
    from atm_jax import main as main_module

    record = {"epochs": [], "merges": [], "saves": [], "items": []}

    def timed(fn, sink, describe):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            sink.append({"seconds": time.perf_counter() - start, **describe(args, result)})
            return result
        return wrapper

    epoch_steps = finetune.Finetuner.epoch_steps

    def timed_epoch(self, state, inputs, labels, **kwargs):  # the runner's epoch generator
        start = time.perf_counter()
        state, metrics = yield from epoch_steps(self, state, inputs, labels, **kwargs)
        record["epochs"].append({"seconds": time.perf_counter() - start,  # metrics synced
                                 "steps": metrics["steps"], "examples": len(inputs),
                                 "classes": int(state["head"]["kernel"].shape[-1])})
        return state, metrics

    finetune.Finetuner.epoch_steps = timed_epoch

    def merge_info(args, result):
        import jax
        jax.block_until_ready(result[0])
        return {"merge": args[2].name, "merge_seconds": result[1]["merge_seconds"]}

    atm.merge_step = timed(atm.merge_step, record["merges"], merge_info)
    # The writes themselves (on the checkpoint thread, while training goes on).
    checkpoint.Checkpointer._write_step = timed(checkpoint.Checkpointer._write_step,
                                                record["saves"], lambda a, r: {})
    checkpoint.Checkpointer._write_item = timed(checkpoint.Checkpointer._write_item,
                                                record["items"], lambda a, r: {})

    def main(args):
        try:
            main_module.main(args)
        finally:
            pathlib.Path(out).write_text(json.dumps(record))

    app.run(main, argv=["atm_jax.main", *argv])


def run_measured(model: str, root: pathlib.Path, values: dict, workdir: pathlib.Path,
                 log: pathlib.Path) -> dict:
    """Runs the instrumented child; returns its timings, peak RSS and wall time."""
    out = root / "timings.json"
    cmd = [sys.executable, __file__, "--child-run", str(out), "--",
           f"--config={CONFIGS[model]}", f"--workdir={workdir}", *flags(values)]
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=common.ROOT, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"the {model} run failed (exit {code}); its log: {log}\n"
                           + log.read_text()[-3000:])
    return {**json.loads(out.read_text()), "peak_rss_bytes": usage.ru_maxrss * 1024,
            "wall_seconds": wall}


# -- FLOPs and the HF round trip, in a second process -------------------------------------


def child_probe(out: str, model: str, workdir: str, values_json: str) -> None:
    """XLA FLOPs of one train step and one eval forward at batch BATCH, and every
    export loaded with transformers and compared with our forward."""
    import flax
    import jax
    import numpy as np
    import torch
    import transformers

    from atm_jax import recipes
    from atm_jax.data import preprocess
    from atm_jax.finetune import Finetuner, OptimizerConfig, as_inputs
    from atm_jax.models.heads import apply_head
    from atm_jax.suites import paper

    config = recipes.paper_config(model)
    values = json.loads(values_json)
    for path, value in values.items():
        *parents, leaf = path.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = tuple(value) if isinstance(value, list) else value
    setup = paper.build(config, lambda *_: None)
    task = next(iter(setup.tasks.values()))
    head = next(iter(setup.heads.values()))
    x, y = as_inputs(task.train[0][:BATCH]), np.asarray(task.train[1][:BATCH], np.int32)
    if len(x) < BATCH:
        raise RuntimeError(f"need {BATCH} training examples for the FLOPs probe, got {len(x)}")
    finetuner = Finetuner(setup.apply_fn, OptimizerConfig(**config.optimizer.to_dict()),
                          train_head=False, augment=setup.augment)
    state = finetuner.init_state(setup.base, head)
    batch = {"inputs": x, "labels": y, "mask": np.ones(BATCH, np.float32)}
    if setup.augment is not None:
        batch["key"] = jax.random.key(0)

    def flops(compiled) -> float:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])

    start = time.perf_counter()
    train_flops = flops(finetuner.train_step.lower(state, batch).compile())
    compile_seconds = time.perf_counter() - start
    forward = jax.jit(lambda b, inputs: apply_head(head, setup.apply_fn(b, inputs, False)))
    eval_flops = flops(forward.lower(setup.base, x).compile())

    inputs = as_inputs(task.test[0][:4])
    base_out = np.asarray(setup.apply_fn(setup.base, inputs, False))
    exports = {}
    hf_root = pathlib.Path(workdir) / "hf"  # absent when the run stopped early: FLOPs only
    for folder in sorted(hf_root.iterdir()) if hf_root.is_dir() else []:
        params_file = pathlib.Path(workdir) / "params" / f"{folder.name}.msgpack"
        merged = flax.serialization.msgpack_restore(params_file.read_bytes())
        ours = np.asarray(setup.apply_fn(merged, inputs, False))
        net, info = transformers.AutoModel.from_pretrained(folder, output_loading_info=True)
        net.eval()
        with torch.no_grad():
            if model == "clip":
                size = net.config.vision_config.image_size
                pixels = np.asarray(preprocess.normalize(preprocess.resize_center_crop(inputs, size)))
                theirs = net.get_image_features(
                    pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
                theirs = theirs if isinstance(theirs, torch.Tensor) else theirs.pooler_output
                theirs = theirs / theirs.norm(dim=-1, keepdim=True)
            else:
                t = torch.from_numpy(inputs.astype(np.int64))
                theirs = net(input_ids=t[:, 0], attention_mask=t[:, 1],
                             token_type_ids=t[:, 2]).pooler_output
        exports[folder.name] = {
            "bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()),
            "class": type(net).__name__,
            "missing_or_unexpected": len(info["missing_keys"]) + len(info["unexpected_keys"]),
            "max_abs_diff": float(np.abs(ours - theirs.numpy()).max()),
            "moved_from_base": float(np.abs(ours - base_out).max()),
        }
    pathlib.Path(out).write_text(json.dumps({
        "train_step_flops": train_flops, "eval_forward_flops": eval_flops,
        "probe_compile_seconds": compile_seconds, "exports": exports,
        "params": int(sum(np.size(a) for a in jax.tree.leaves(setup.base)))}))


def run_probe(model: str, root: pathlib.Path, values: dict, workdir: pathlib.Path,
              probe_tasks: tuple[str, ...]) -> dict:
    out = root / "probe.json"
    values = {**values, "tasks": list(probe_tasks)}
    cmd = [sys.executable, __file__, "--child-probe", str(out), model, str(workdir),
           json.dumps(values)]
    proc = subprocess.run(cmd, cwd=common.ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the {model} probe failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


# -- projection ------------------------------------------------------------------------


def project(model: str, train_step_flops: float, eval_forward_flops: float, *,
            batch: int = BATCH) -> dict:
    """The paper's full runs from FLOPs: examples × FLOPs per example ÷ (peak × MFU).

    Per task the 90% / 10% (cap 5000) train / validation cut of the source's
    training split. Training: the one-shot finetunes (shared by TA / TIES /
    Breadcrumbs / DARE) 10 epochs on train, ATM 10 × 1 epoch on train, and for CLIP
    valFT ATM 10 × 1 epoch on validation. Evaluation: one pass over every test set
    for the pretrained base, one for the individual models (each on its task), one
    per one-shot merge, 11 per ATM variant (iterations 0..10).
    """
    from atm_jax import recipes

    tasks = recipes.PAPER[model]["tasks"]
    train = val = test = 0
    for name in tasks:
        n, n_test = SOURCE_SIZES[name]
        held = min(int(n * 0.1), 5000)
        train, val, test = train + n - held, val + held, test + n_test
    atm_methods = recipes.PAPER[model]["atm"]
    train_examples = EPOCHS * train + ITERATIONS * train
    if "valft_atm" in atm_methods:
        train_examples += ITERATIONS * val
    passes = 2 + len(recipes.PAPER[model]["one_shot"]) + (ITERATIONS + 1) * len(atm_methods)
    eval_examples = passes * test
    total = train_examples * train_step_flops / batch + eval_examples * eval_forward_flops / batch
    hours = {f"{name} @ MFU {m:.0%}": total / (peak * m) / 3600
             for name, peak in ACCELERATORS.items() for m in MFUS}
    return {"train_examples": train_examples, "eval_examples": eval_examples,
            "eval_passes": passes, "total_flops": total, "hours": hours}


# -- the report ------------------------------------------------------------------------


def median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")


def summarize(model: str, run: dict, probe: dict, workdir: pathlib.Path) -> dict:
    epochs = run["epochs"]
    # The first epoch of each head shape compiles the step; the others are steady state.
    seen, steady = set(), []
    for e in epochs:
        if e["classes"] in seen:
            steady.append(e["seconds"] / e["steps"])
        seen.add(e["classes"])
    merges = {}
    for m in run["merges"]:
        merges.setdefault(m["merge"], []).append(m["seconds"])
    saves = [s["seconds"] for s in run["saves"]]
    items = [s["seconds"] for s in run["items"]]
    hf_bytes = sum(f.stat().st_size for f in (workdir / "hf").rglob("*") if f.is_file())
    return {
        "model": model, "params": probe["params"], "wall_seconds": run["wall_seconds"],
        "peak_rss_gib": run["peak_rss_bytes"] / 2**30, "epochs": len(epochs),
        "steps": sum(e["steps"] for e in epochs),
        "step_seconds": median(steady), "steady_steps": len(steady),
        "first_epoch_seconds": epochs[0]["seconds"] if epochs else float("nan"),
        "merge_seconds": {k: median(v) for k, v in merges.items()},
        "saves": len(saves), "save_seconds": median(saves), "save_seconds_max": max(saves),
        "items": len(items), "item_seconds": median(items),
        "export_mib": hf_bytes / 2**20, "exports": probe["exports"],
        "train_step_gflops": probe["train_step_flops"] / 1e9,
        "eval_forward_gflops": probe["eval_forward_flops"] / 1e9,
        "projection": project(model, probe["train_step_flops"], probe["eval_forward_flops"]),
    }


def table(rows: list[dict]) -> str:
    lines = ["| | " + " | ".join(r["model"] for r in rows) + " |",
             "|---|" + "---:|" * len(rows)]

    def add(label, fn):
        lines.append(f"| {label} | " + " | ".join(fn(r) for r in rows) + " |")

    add("backbone params (merged)", lambda r: f"{r['params'] / 1e6:.1f}M")
    add("run wall time (s)", lambda r: f"{r['wall_seconds']:.0f}")
    add("peak host memory (GiB)", lambda r: f"{r['peak_rss_gib']:.2f}")
    add("train epochs / steps (batch 8)", lambda r: f"{r['epochs']} / {r['steps']}")
    add("step time, steady (s, median)", lambda r: f"{r['step_seconds']:.2f} (n={r['steady_steps']})")
    add("first epoch incl. compile (s)", lambda r: f"{r['first_epoch_seconds']:.1f}")
    add("merge time (s)", lambda r: ", ".join(f"{k} {v:.1f}" for k, v in r["merge_seconds"].items()))
    add("checkpoint step writes (s, median / max; checkpoint thread)",
        lambda r: f"{r['saves']} × {r['save_seconds']:.2f} / {r['save_seconds_max']:.2f}")
    add("finetuned-model item writes (s, median)", lambda r: f"{r['items']} × {r['item_seconds']:.2f}")
    add("HF export size (MiB, all methods)",
        lambda r: f"{r['export_mib']:.0f} ({len(r['exports'])} folders)")
    add("HF round trip: max abs diff vs our forward",
        lambda r: f"{max(e['max_abs_diff'] for e in r['exports'].values()):.1e}")
    add("export moved from base (max abs output diff)",
        lambda r: f"{min(e['moved_from_base'] for e in r['exports'].values()):.1e}")
    add("XLA FLOPs: train step / eval forward (batch 8)",
        lambda r: f"{r['train_step_gflops']:.0f} G / {r['eval_forward_gflops']:.0f} G")
    add("paper run: train / eval examples",
        lambda r: f"{r['projection']['train_examples'] / 1e6:.2f}M / "
                  f"{r['projection']['eval_examples'] / 1e6:.2f}M")
    add("paper run: total FLOPs", lambda r: f"{r['projection']['total_flops']:.2e}")
    for key in rows[0]["projection"]["hours"]:
        add(f"projected hours, {key}", lambda r, k=key: f"{r['projection']['hours'][k]:.1f}")
    return "\n".join(lines) + "\n"


def rehearse(model: str, root: pathlib.Path, *, tiny: bool = False, tasks=None,
             test_size: int = TEST_SIZE, text_layers: int = 12) -> dict:
    """Prepares, runs, probes and summarizes one architecture under ``root``."""
    print(f"[{model}] writing the random-init model and the stand-in tasks under {root}",
          flush=True)
    values = prepare(model, root, tiny=tiny, tasks=tasks, test_size=test_size,
                     text_layers=text_layers)
    workdir = root / "workdir"
    print(f"[{model}] running {CONFIGS[model]} (log: {root / 'run.log'})", flush=True)
    run = run_measured(model, root, values, workdir, root / "run.log")
    print(f"[{model}] run done in {run['wall_seconds']:.0f} s; probing FLOPs and HF exports",
          flush=True)
    # One small task is enough: FLOPs and exports do not depend on the tasks.
    probe_task = tuple(tasks)[:1] if tasks else (("mnist",) if model == "clip" else ("cola",))
    probe = run_probe(model, root, values, workdir, probe_task)
    return {**summarize(model, run, probe, workdir), "test_size": test_size,
            "clip_text_layers": text_layers if model == "clip" else None}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-run":
        return child_run(sys.argv[2], sys.argv[4:])
    if len(sys.argv) > 1 and sys.argv[1] == "--child-probe":
        return child_probe(*sys.argv[2:6])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), action="append")
    parser.add_argument("--all", action="store_true", help="both architectures")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the machinery only)")
    parser.add_argument("--root", help="keep the files here (default: a temporary folder)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--test-size", type=int, default=TEST_SIZE,
                        help="test examples per task (and the eval batch)")
    parser.add_argument("--clip-text-layers", type=int, default=12,
                        help="CLIP text tower layers (< 12: also a 32-token context); it only "
                             "encodes the zero-shot prompts, once")
    args = parser.parse_args()
    models = sorted(CONFIGS) if args.all else (args.model or [])
    if not models:
        parser.error("name --model clip|bert (repeatable) or --all")
    base = pathlib.Path(args.root or tempfile.mkdtemp(prefix="atm_rehearsal_"))
    started, load_before = common.utc_now(), os.getloadavg()[0]
    rows = [rehearse(m, base / m, tiny=args.tiny, test_size=args.test_size,
                     text_layers=args.clip_text_layers) for m in models]
    body = table(rows)
    print("\n" + body)
    print(json.dumps(rows, indent=1, default=str))
    if not args.root:
        shutil.rmtree(base, ignore_errors=True)
    if args.no_write:
        return
    path = common.write_results("rehearsal", [
        common.versions("jax", "flax", "orbax.checkpoint", "transformers", "torch"),
        " and ".join({"clip": "random-init CLIP ViT-B/16 (configs/vit.py)",
                      "bert": "random-init BERT-base (configs/bert.py)"}[m] for m in models)
        + " through `python -m atm_jax.main`, the 7 paper tasks as generated stand-ins with "
        f"their class counts; budget 1, ATM 1 iteration, batch {BATCH}, {TRAIN_SIZE} train / "
        f"{VALIDATION_CAP} validation / {args.test_size} test examples per task"
        + (f"; CLIP text tower {args.clip_text_layers} layers, 32-token context (only the "
           "zero-shot heads use it)" if "clip" in models and args.clip_text_layers != 12 else "")
        + (" (TINY shapes: machinery check, not a measurement)" if args.tiny else ""),
        f"{os.cpu_count()} cores; 1-min load average {load_before:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (above the core count = shared with other "
        f"jobs); niceness {os.nice(0)}",
    ], body + "\n" + NOTES + "\n```json\n" + json.dumps(rows, indent=1, default=str) + "\n```\n",
        stamp=started)
    print(f"\nwrote {path.relative_to(common.ROOT)}")


NOTES = """\
How the projection is made: total FLOPs = training examples × (XLA's FLOPs of one
jitted train step at batch 8 ÷ 8) + evaluation examples × (XLA's FLOPs of one eval
forward at batch 8 ÷ 8), then ÷ (peak dense bf16 FLOP/s × MFU) for an H200
(989 TFLOP/s) and a TPU v4-8 (4 × 275 TFLOP/s), MFU 30% and 40% (assumed, not
measured). Training examples: each task's 90% train cut (validation 10%, cap 5000) ×
(10 one-shot epochs + 10 ATM iterations × 1 epoch) + for CLIP valFT ATM 10 × the
validation cut; evaluation: every test set once for the pretrained base, the
individual models, each one-shot merge, and 11 times per ATM variant. Left out:
merges (seconds each on an accelerator), checkpoint writes (one per task finetune
and per merge; CPU times above), CLIP's zero-shot head encoding, data decoding and
host input pipelines, compilation, and the paper's batch 32 vs the measured batch 8
(FLOPs per example are the same; MFU at 32 is likely higher). The run itself uses
float32 params and compute; bf16 peak assumes bf16 matmuls (TPU's default f32
matmul precision; `config.precision` on GPU).
"""

if __name__ == "__main__":
    main()
