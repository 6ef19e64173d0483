"""Where a train step's time goes: ours and PyTorch split into parts, and candidate fixes.

For one `train_bench` row (same model, batch, optimizer and inputs) this measures,
each in its own process:

* parts: forward (loss only), forward + backward (loss and gradients), optimizer
  update (clip + Adam on fixed gradients), for ours (each part jitted alone) and
  PyTorch (forward under ``no_grad``; ``backward``; ``clip_grad_norm_`` + ``step``);
* variants of our full step, changed by monkeypatching in the worker process
  (nothing in ``atm_jax/`` is edited) or by ``XLA_FLAGS``:

  - ``baseline``: `atm_jax.finetune.Finetuner`'s step as the runner uses it;
  - ``preplaced``: batches ``jax.device_put`` once instead of host NumPy per step
    (the cost of the per-step host→device copy);
  - ``no_donate``: the same step jitted without donating the state;
  - ``gelu_tanh``: BERT's exact (erf) GELU replaced by the tanh approximation
    (changes the model: only shows what erf costs);
  - ``ln_fast``: LayerNorm with the one-pass E[x²]−E[x]² variance;
  - ``attn_einsum``: ``jax.nn.dot_product_attention`` replaced by einsum + softmax;
  - ``attn_nomask``: the all-ones attention mask dropped (transformers drops an
    all-ones mask before SDPA; our encoder always applies one);
  - ``xla:FLAGS``: the baseline step under ``XLA_FLAGS=FLAGS``;

* with ``--ops``: where the baseline step's time goes inside XLA, from a
  ``jax.profiler`` trace of a few steps: the run time of every executed op (thunk)
  summed per op kind (``ynn_fusion.132`` → ``ynn_fusion``: matrix products run by
  YNNPACK; ``copy_bitcast_fusion``: layout copies; ...), per step, against the step's
  wall time.

Run::

  python benchmarks/train_profile.py --rows minilm_s64            # prints a table
  python benchmarks/train_profile.py --rows clip_b16 --variants baseline,ln_fast --no-parts
  python benchmarks/train_profile.py --rows minilm_s64 --ops --no-parts --variants ''
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402
import train_bench  # noqa: E402

DEFAULT_VARIANTS = ("baseline", "preplaced", "no_donate", "gelu_tanh", "ln_fast", "attn_einsum",
                    "attn_nomask", "xla:--xla_cpu_use_thunk_runtime=false",
                    "xla:--xla_cpu_enable_fast_math=true", "xla:--xla_cpu_use_xnnpack=true",
                    "xla:--xla_cpu_use_onednn=true")


def patch(variant: str) -> None:
    """Monkeypatches the models for `variant` (this process only)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from atm_jax.models import bert, clip

    if variant == "gelu_tanh":
        bert.ACTIVATIONS["gelu"] = lambda x: jax.nn.gelu(x, approximate=True)
    elif variant == "ln_fast":
        def fast(eps, name):
            return nn.LayerNorm(epsilon=eps, use_fast_variance=True, name=name)
        bert._layer_norm = fast
        clip._layer_norm = fast
    elif variant == "attn_einsum":
        def attention(q, k, v, bias=None, mask=None, **_):
            logits = jnp.einsum("bqhd,bkhd->bhqk", q * q.shape[-1] ** -0.5, k)
            if mask is not None:
                logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
            return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        jax.nn.dot_product_attention = attention
    elif variant == "attn_nomask":
        original = jax.nn.dot_product_attention

        def attention(q, k, v, bias=None, mask=None, **kw):
            return original(q, k, v, bias=bias, **kw)
        jax.nn.dot_product_attention = attention


def jax_step_worker(row, batch, windows, window_s, variant) -> dict:
    import jax

    from atm_jax import finetune

    if not variant.startswith("xla:"):
        patch(variant)
    if variant == "no_donate":
        original = jax.jit

        def jit_no_donate(fn, **kw):
            kw.pop("donate_argnums", None)
            return original(fn, **kw)
        finetune.jax.jit = jit_no_donate  # the module's jax is the global one: restore below
        try:
            return train_bench.jax_worker(row, batch, windows, window_s)
        finally:
            finetune.jax.jit = original
    if variant == "preplaced":
        original = train_bench.make_batches

        def placed(*a, **kw):
            return [jax.device_put(b) for b in original(*a, **kw)]
        train_bench.make_batches = placed
    return train_bench.jax_worker(row, batch, windows, window_s)


def _time(call, sync, windows, window_s) -> list[float]:
    start = time.perf_counter()
    call()
    sync()
    step = time.perf_counter() - start
    steps = max(1, math.ceil(window_s / step))
    return common.timed_windows(call, windows=windows, steps=steps, sync=sync)


def jax_parts_worker(row, batch, windows, window_s) -> dict:
    import jax
    import optax

    from atm_jax import finetune
    from atm_jax.models import heads

    apply_fn, backbone, width, _ = train_bench.jax_model(row)
    backbone = jax.device_put(backbone)
    head = heads.init_head(jax.random.key(1), width, train_bench.NUM_CLASSES)
    b = jax.device_put(train_bench.make_batches(row, batch, count=1)[0])

    def loss_fn(params):
        logits = heads.apply_head(head, apply_fn(params, b["inputs"], True))
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()

    fwd = jax.jit(loss_fn)
    grad = jax.jit(jax.value_and_grad(loss_fn))
    tx = finetune.make_optimizer(finetune.OptimizerConfig(
        learning_rate=train_bench.LEARNING_RATE, grad_clip=train_bench.GRAD_CLIP, batch_size=batch))
    grads = grad(backbone)[1]

    @jax.jit
    def update(params, opt_state):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    out = {}
    holder = {"r": None}
    for name, call in (("forward", lambda: fwd(backbone)), ("forward+backward", lambda: grad(backbone))):
        def run(call=call):
            holder["r"] = call()
        start = time.perf_counter()
        run()
        jax.block_until_ready(holder["r"])
        out[f"{name} compile_s"] = time.perf_counter() - start
        out[name] = _time(run, lambda: jax.block_until_ready(holder["r"]), windows, window_s)
    state = {"p": jax.tree.map(lambda a: a + 0, backbone)}
    state["o"] = tx.init(state["p"])

    def run_update():
        state["p"], state["o"] = update(state["p"], state["o"])
    run_update()
    out["update"] = _time(run_update, lambda: jax.block_until_ready(state["p"]), windows, window_s)
    return out


# Events of a CPU trace that wrap or wait for ops rather than run one.
_NOT_OPS = ("ThunkExecutor", "Await", "end: ")


def jax_ops_worker(row, batch, steps: int) -> dict:
    """Traces `steps` baseline steps; per-op-kind thread seconds per step."""
    import collections
    import re
    import tempfile

    import jax

    from atm_jax import finetune
    from atm_jax.models import heads

    apply_fn, backbone, width, _ = train_bench.jax_model(row)
    head = heads.init_head(jax.random.key(1), width, train_bench.NUM_CLASSES)
    opt = finetune.OptimizerConfig(learning_rate=train_bench.LEARNING_RATE,
                                   grad_clip=train_bench.GRAD_CLIP, batch_size=batch, name="adam")
    finetuner = finetune.Finetuner(apply_fn, opt, train_head=False)
    state = finetuner.init_state(backbone, head)
    del backbone
    batches = [{"inputs": b["inputs"], "labels": b["labels"], "mask": np.ones(batch, np.float32)}
               for b in train_bench.make_batches(row, batch)]
    for i in range(2):  # compile, warm up
        state, metrics = finetuner.train_step(state, batches[i % len(batches)])
        jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder)
        start = time.perf_counter()
        for i in range(steps):
            state, metrics = finetuner.train_step(state, batches[i % len(batches)])
        jax.block_until_ready(metrics)
        wall = (time.perf_counter() - start) / steps
        jax.profiler.stop_trace()
        traces = list(pathlib.Path(folder).rglob("*.xplane.pb"))
        data = jax.profiler.ProfileData.from_file(str(traces[0]))
    seconds, counts, threads = collections.Counter(), collections.Counter(), set()
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                if any(word in event.name for word in _NOT_OPS):
                    continue
                kind = re.sub(r"\.\d+$", "", event.name)
                seconds[kind] += event.duration_ns / 1e9 / steps
                counts[kind] += 1 / steps
                threads.add(line.name)
    return {"wall_s": wall, "threads": len(threads), "seconds": dict(seconds),
            "counts": dict(counts)}


def torch_parts_worker(row, batch, windows, window_s) -> dict:
    import torch
    from torch.nn import functional as F

    torch.manual_seed(0)
    torch.set_num_threads(common.cpu_count())
    model, forward, width, _ = train_bench.torch_model(row)
    model.train()
    head = torch.nn.Linear(width, train_bench.NUM_CLASSES)
    head.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=train_bench.LEARNING_RATE)
    b = train_bench.make_batches(row, batch, count=1)[0]
    x = torch.from_numpy(b["inputs"])
    if not row.is_text():
        x = x.permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(b["labels"]).long()

    def fwd():
        with torch.no_grad():
            F.cross_entropy(head(forward(model, x)), y)

    def grad():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(head(forward(model, x)), y).backward()

    def update():
        torch.nn.utils.clip_grad_norm_(params, train_bench.GRAD_CLIP)
        opt.step()

    out = {}
    for name, call in (("forward", fwd), ("forward+backward", grad), ("update", update)):
        call()  # warm-up
        out[name] = _time(call, lambda: None, windows, window_s)
    return out


def _ops_table(ops: dict, top: int = 12) -> list[str]:
    """Markdown lines: the op kinds taking most thread time per traced step."""
    wall, threads = ops["wall_s"], ops["threads"]
    total = sum(ops["seconds"].values())
    lines = [(f"Traced step: {1000 * wall:.0f} ms wall; its ops ran for {1000 * total:.0f} ms "
              f"in all ({total / wall:.2f}× the wall time), traced on {threads} threads (a "
              "matrix product may use both cores inside one op, so this is not CPU use)."), "",
             "| op kind | ms per step (thread time) | ops per step | share of op time |",
             "|---|---:|---:|---:|"]
    ranked = sorted(ops["seconds"].items(), key=lambda kv: -kv[1])
    for kind, sec in ranked[:top]:
        lines.append(f"| {kind} | {1000 * sec:.1f} | {ops['counts'][kind]:.0f} | "
                     f"{sec / total:.1%} |")
    rest = sum(sec for _, sec in ranked[top:])
    lines += [f"| {len(ranked) - top} other kinds | {1000 * rest:.1f} | | {rest / total:.1%} |", ""]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="minilm_s64")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma-separated (an xla: variant may not contain commas)")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--window-s", type=float, default=2.0)
    parser.add_argument("--no-parts", action="store_true")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--ops", action="store_true",
                        help="also trace the baseline step and sum its XLA ops' time by kind")
    parser.add_argument("--trace-steps", type=int, default=3, help="steps traced for --ops")
    parser.add_argument("--out", help="also write the table and raw numbers here (.md, .json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        row = train_bench.ROWS[args.rows]
        if args.worker == "step":
            out = jax_step_worker(row, args.batch, args.windows, args.window_s, args.variant)
        elif args.worker == "ops":
            out = jax_ops_worker(row, args.batch, args.trace_steps)
        elif args.worker == "jax-parts":
            out = jax_parts_worker(row, args.batch, args.windows, args.window_s)
        else:
            out = torch_parts_worker(row, args.batch, args.windows, args.window_s)
        print(json.dumps(out))
        return

    report = []
    raw = {}
    for name in args.rows.split(","):
        row = train_bench.ROWS[name]
        batch = row.batch
        common_args = ["--rows", name, "--batch", str(batch), "--windows", str(args.windows),
                       "--window-s", str(args.window_s)]
        report += [f"### {row.label}, batch {batch} ({common.cpu_count()} cores)", ""]
        if not args.no_parts:
            ours = common.run_worker(__file__, ["--worker", "jax-parts", *common_args])
            theirs = None if args.no_torch else common.run_worker(
                __file__, ["--worker", "torch-parts", *common_args])
            raw[f"{name}/parts"] = {"ours": ours, "torch": theirs}
            report += ["| part | ours ms | PyTorch ms | ours ÷ PyTorch time |", "|---|---:|---:|---:|"]
            for part in ("forward", "forward+backward", "update"):
                a = 1000 * common.median(ours[part]) if ours else None
                b = 1000 * common.median(theirs[part]) if theirs else None
                report.append(f"| {part} | {a:.1f} | " + (f"{b:.1f} | {a / b:.2f} |" if b else "– | – |"))
            report.append("")
        if args.ops:
            ops = common.run_worker(__file__, ["--worker", "ops", "--trace-steps",
                                               str(args.trace_steps), *common_args])
            raw[f"{name}/ops"] = ops
            report += _ops_table(ops) if ops else ["(the traced step failed)", ""]
        if not args.variants:
            continue
        report += ["| variant of our step | ms/step | ex/s | vs baseline | windows ms |",
                   "|---|---:|---:|---:|---:|"]
        base = None
        for variant in args.variants.split(","):
            env = {}
            if variant.startswith("xla:"):
                env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + variant[4:]).strip()
            r = common.run_worker(__file__, ["--worker", "step", "--variant", variant, *common_args],
                                  env=env)
            raw[f"{name}/{variant}"] = r
            if r is None:
                report.append(f"| {variant} | failed | | | |")
                continue
            ms = 1000 * common.median(r["times"])
            base = base or ms
            spread = f"{1000 * min(r['times']):.0f}–{1000 * max(r['times']):.0f}"
            report.append(f"| {variant} | {ms:.1f} | {batch / ms * 1000:.2f} | {base / ms:.2f}× | {spread} |")
            print(report[-1], flush=True)
        report.append("")
    text = "\n".join(report)
    print()
    print(text)
    if args.out:
        out = pathlib.Path(args.out)
        header = f"- machine: {common.machine()}\n- {common.versions('jax', 'torch')}\n\n"
        out.with_suffix(".md").write_text(header + text + "\n")
        out.with_suffix(".json").write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
