"""Training throughput of our jitted train step against the same training in PyTorch.

Each row trains one backbone with a frozen linear head (10 classes) on the pooled /
class-token features, cross-entropy, Adam (lr 1e-5, eps 1e-8) after global-norm
gradient clipping at 10, no dropout, on the same batches on both sides:

* ours: `atm_jax.finetune.Finetuner`'s jitted, state-donating step (the step the
  runner uses), fed host NumPy batches as the runner feeds it, blocked on only at
  the end of each timed window (asynchronous dispatch, as in the runner);
* PyTorch: ``zero_grad; forward; cross_entropy; backward; clip_grad_norm_; step``
  with ``torch.optim.Adam`` defaults and transformers' ``BertModel`` /
  ``CLIPVisionModelWithProjection`` (their default attention), or for the mini ViT
  a PyTorch twin written here and checked to give our logits from our weights.

Throughput is examples/s from the median of several timed windows after warm-up
(compile + one step). Every measurement runs in its own process.

Run::

  python benchmarks/train_bench.py                       # all rows, writes benchmarks/results/
  python benchmarks/train_bench.py --quick --no-write    # two small rows, short windows
  python benchmarks/train_bench.py --rows minilm_s64 --windows 7
  # on an accelerator machine, no torch needed, bigger batches:
  python benchmarks/train_bench.py --jax-only --batch-scale 8 --device-note "1× H200"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

NUM_CLASSES = 10
LEARNING_RATE = 1e-5
GRAD_CLIP = 10.0
# all-MiniLM-L6-v2's config.json (dropout is switched off below): used for the
# shapes when its weights cannot be fetched (e.g. an offline accelerator machine).
MINILM_CONFIG = {
    "model_type": "bert", "architectures": ["BertModel"], "hidden_act": "gelu",
    "hidden_size": 384, "intermediate_size": 1536, "num_attention_heads": 12,
    "num_hidden_layers": 6, "max_position_embeddings": 512, "type_vocab_size": 2,
    "vocab_size": 30522, "layer_norm_eps": 1e-12, "initializer_range": 0.02,
    "pad_token_id": 0, "position_embedding_type": "absolute",
}
BERT_BASE_CONFIG = {**MINILM_CONFIG, "hidden_size": 768, "intermediate_size": 3072,
                    "num_hidden_layers": 12}
CLIP_B16_CONFIG = {"model_type": "clip", "projection_dim": 512, "vision_config": {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "image_size": 224, "patch_size": 16, "num_channels": 3,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "initializer_range": 0.02}}


@dataclasses.dataclass(frozen=True)
class Row:
    """One benchmark row: a model and its batch shape."""

    name: str
    label: str
    model: str  # vit_tiny | minilm | clip_b16 | bert_base
    batch: int
    seq: int = 0  # tokens per example for text models

    def is_text(self) -> bool:
        return self.model in ("minilm", "bert_base")


ROWS = {r.name: r for r in [
    Row("vit_tiny", "mini ViT (0.8M), 28×28×1", "vit_tiny", 32),
    Row("minilm_s64", "all-MiniLM-L6-v2 (22.7M), seq 64", "minilm", 32, 64),
    Row("minilm_s128", "all-MiniLM-L6-v2 (22.7M), seq 128", "minilm", 32, 128),
    Row("clip_b16", "CLIP ViT-B/16 vision tower (87.8M), 224²", "clip_b16", 8),
    Row("bert_base", "BERT-base (109.5M), seq 128", "bert_base", 8, 128),
]}
QUICK_ROWS = ("vit_tiny", "minilm_s64")


# ----------------------------------------------------------------------------
# Inputs: the same host batches on both sides
# ----------------------------------------------------------------------------


def make_batches(row: Row, batch: int, count: int = 3, seed: int = 0) -> list[dict]:
    """`count` host batches: {"inputs", "labels"} as NumPy, in our (NHWC) layout.

    Text inputs are packed as the runner packs them: [B, 3, L] int32 holding token
    ids, attention mask (all ones: no padding) and token types (zeros).
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        labels = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
        if row.is_text():
            ids = rng.integers(1000, 30522, (batch, row.seq)).astype(np.int32)
            ids[:, 0] = 101  # [CLS]
            inputs = np.stack([ids, np.ones_like(ids), np.zeros_like(ids)], axis=1)
        elif row.model == "vit_tiny":
            inputs = rng.random((batch, 28, 28, 1), dtype=np.float32)
        else:
            inputs = rng.standard_normal((batch, 224, 224, 3), dtype=np.float32)
        out.append({"inputs": inputs, "labels": labels})
    return out


def minilm_folder():
    """all-MiniLM-L6-v2's folder, or None when it cannot be had here."""
    try:
        from atm_jax.models import pretrained

        return pretrained.minilm_folder()
    except Exception as e:  # noqa: BLE001 - any failure means: fall back to random init
        print(f"all-MiniLM-L6-v2 weights unavailable ({type(e).__name__}: {e}); "
              "using random init with its shapes", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------
# Our side
# ----------------------------------------------------------------------------


def jax_model(row: Row, seed: int = 0):
    """(apply_fn, backbone params, feature width, weights note) for `row`."""
    import jax
    import jax.numpy as jnp

    key = jax.random.key(seed)
    if row.model == "vit_tiny":
        from atm_jax.models import vit_tiny

        model = vit_tiny.ViT()
        params = model.init(key, jnp.zeros((1, 28, 28, 1)))["params"]

        def apply_fn(backbone, images, train):
            return model.apply({"params": backbone}, images, train)

        return apply_fn, params, model.width, "random init"
    if row.model == "clip_b16":
        from atm_jax.models import clip

        vision = clip.vision_model(CLIP_B16_CONFIG)
        params = clip.init_params(CLIP_B16_CONFIG, key)["vision"]

        def apply_fn(backbone, images, train):
            # As the runner's CLIP apply_fn, minus resizing/normalizing (inputs are
            # already normalized 224² here).
            embeds = vision.apply({"params": backbone}, images)
            return embeds / jnp.linalg.norm(embeds, axis=-1, keepdims=True)

        return apply_fn, params, 512, "random init"

    from atm_jax.models import bert, hf

    config, note = BERT_BASE_CONFIG, "random init"
    if row.model == "minilm":
        folder = minilm_folder()
        config = MINILM_CONFIG
        if folder is not None:
            checkpoint = hf.load(folder)
            config, params, note = checkpoint.config, checkpoint.params, "real weights"
    if note == "random init":
        params = bert.init_params(config, key)
    encoder = bert.encoder(config)

    def apply_fn(backbone, tokens, train):
        # As the runner's BERT apply_fn: pooled output of packed (ids, mask, types).
        return encoder.apply({"params": backbone}, tokens[:, 0], tokens[:, 1], tokens[:, 2])[1]

    return apply_fn, params, int(config["hidden_size"]), note


def jax_worker(row: Row, batch: int, windows: int, window_s: float) -> dict:
    import jax

    from atm_jax import finetune
    from atm_jax.models import heads

    apply_fn, backbone, width, note = jax_model(row)
    head = heads.init_head(jax.random.key(1), width, NUM_CLASSES)
    opt = finetune.OptimizerConfig(learning_rate=LEARNING_RATE, grad_clip=GRAD_CLIP,
                                   batch_size=batch, name="adam")
    finetuner = finetune.Finetuner(apply_fn, opt, train_head=False)
    state = finetuner.init_state(backbone, head)
    del backbone
    batches = [{"inputs": b["inputs"], "labels": b["labels"], "mask": np.ones(batch, np.float32)}
               for b in make_batches(row, batch)]
    holder = {"state": state, "i": 0, "metrics": None}

    def call():
        b = batches[holder["i"] % len(batches)]
        holder["state"], holder["metrics"] = finetuner.train_step(holder["state"], b)
        holder["i"] += 1

    def sync():
        jax.block_until_ready((holder["state"], holder["metrics"]))

    start = time.perf_counter()
    call()
    sync()
    first = time.perf_counter() - start  # compile + one step
    start = time.perf_counter()
    call()
    sync()
    step = time.perf_counter() - start
    steps = max(1, math.ceil(window_s / step))
    times = common.timed_windows(call, windows=windows, steps=steps, sync=sync)
    loss = float(holder["metrics"]["loss"])
    cache_size = getattr(finetuner.train_step, "_cache_size", lambda: -1)()
    return {"times": times, "steps_per_window": steps, "compile_s": first - step,
            "loss": loss, "compiles": cache_size, "note": note,
            "devices": [str(d) for d in jax.devices()], "jax": jax.__version__}


# ----------------------------------------------------------------------------
# PyTorch side
# ----------------------------------------------------------------------------


def torch_vit_twin(flax_params: dict | None = None):
    """A PyTorch module with the mini ViT's exact computation (optionally our weights).

    Mirrors `atm_jax.models.vit_tiny.ViT` defaults: 7×7 patches, width 128, depth 4,
    4 heads, MLP 512, LayerNorm eps 1e-6, tanh-approximate GELU (Flax's default),
    class token first, learned positions, pre-LN blocks, final LN, class token out.
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    width, heads, depth, mlp, patch = 128, 4, 4, 512, 7

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention_norm = nn.LayerNorm(width, eps=1e-6)
            self.qkv = nn.Linear(width, 3 * width)
            self.out = nn.Linear(width, width)
            self.mlp_norm = nn.LayerNorm(width, eps=1e-6)
            self.mlp_in = nn.Linear(width, mlp)
            self.mlp_out = nn.Linear(mlp, width)

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(self.attention_norm(x)).split(width, dim=-1)
            q, k, v = (t.reshape(b, n, heads, width // heads).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, width)
            x = x + self.out(y)
            return x + self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(x)), approximate="tanh"))

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(1, width, patch, stride=patch)
            self.class_token = nn.Parameter(torch.zeros(1, 1, width))
            self.position = nn.Parameter(torch.randn(1, 17, width) * 0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(depth))
            self.final_norm = nn.LayerNorm(width, eps=1e-6)

        def forward(self, images):  # NCHW
            x = self.patch(images).flatten(2).transpose(1, 2)  # row-major (h, w), as Flax
            x = torch.cat([self.class_token.expand(len(x), -1, -1), x], dim=1) + self.position
            for block in self.blocks:
                x = block(x)
            return self.final_norm(x)[:, 0]

    model = ViT()
    if flax_params is not None:
        def t(a):
            return torch.from_numpy(np.array(a, np.float32))

        p = flax_params
        sd = {"patch.weight": t(p["patch_embedding"]["kernel"]).permute(3, 2, 0, 1),
              "patch.bias": t(p["patch_embedding"]["bias"]),
              "class_token": t(p["class_token"]), "position": t(p["position_embedding"]),
              "final_norm.weight": t(p["final_norm"]["scale"]),
              "final_norm.bias": t(p["final_norm"]["bias"])}
        for i in range(depth):
            b, a = p[f"block_{i}"], p[f"block_{i}"]["attention"]
            # Flax DenseGeneral kernels are [D, heads, head_dim] / [heads, head_dim, D].
            sd[f"blocks.{i}.qkv.weight"] = torch.cat(
                [t(a[n]["kernel"]).reshape(width, width).T for n in ("query", "key", "value")])
            sd[f"blocks.{i}.qkv.bias"] = torch.cat(
                [t(a[n]["bias"]).reshape(width) for n in ("query", "key", "value")])
            sd[f"blocks.{i}.out.weight"] = t(a["out"]["kernel"]).reshape(width, width).T
            sd[f"blocks.{i}.out.bias"] = t(a["out"]["bias"])
            for name in ("attention_norm", "mlp_norm"):
                sd[f"blocks.{i}.{name}.weight"] = t(b[name]["scale"])
                sd[f"blocks.{i}.{name}.bias"] = t(b[name]["bias"])
            for name in ("mlp_in", "mlp_out"):
                sd[f"blocks.{i}.{name}.weight"] = t(b[name]["kernel"]).T
                sd[f"blocks.{i}.{name}.bias"] = t(b[name]["bias"])
        model.load_state_dict({k: v.contiguous() for k, v in sd.items()})
    return model


def torch_model(row: Row):
    """(module mapping inputs to features, forward(module, inputs) fn, width, note)."""
    import torch
    import transformers

    if row.model == "vit_tiny":
        return torch_vit_twin(), lambda m, x: m(x), 128, "random init"
    if row.model == "clip_b16":
        v = CLIP_B16_CONFIG["vision_config"]
        config = transformers.CLIPVisionConfig(
            **{k: v[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "image_size", "patch_size",
                                 "num_channels", "hidden_act", "layer_norm_eps")},
            projection_dim=CLIP_B16_CONFIG["projection_dim"], attention_dropout=0.0)
        model = transformers.CLIPVisionModelWithProjection(config)

        def forward(m, x):
            embeds = m(pixel_values=x).image_embeds
            return embeds / embeds.norm(dim=-1, keepdim=True)

        return model, forward, 512, "random init"

    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    folder = minilm_folder() if row.model == "minilm" else None
    if folder is not None:
        model = transformers.BertModel.from_pretrained(str(folder), **no_dropout)
        note = "real weights"
    else:
        base = MINILM_CONFIG if row.model == "minilm" else BERT_BASE_CONFIG
        fields = {k: v for k, v in base.items() if k not in ("model_type", "architectures")}
        model = transformers.BertModel(transformers.BertConfig(**fields, **no_dropout))
        note = "random init"

    def forward(m, tokens):
        return m(input_ids=tokens[:, 0], attention_mask=tokens[:, 1],
                 token_type_ids=tokens[:, 2]).pooler_output

    del torch
    return model, forward, model.config.hidden_size, note


def torch_worker(row: Row, batch: int, windows: int, window_s: float, device: str = "cpu"
                 ) -> dict:
    import torch
    from torch.nn import functional as F

    torch.manual_seed(0)
    torch.set_num_threads(common.cpu_count())
    model, forward, width, note = torch_model(row)
    model.to(device)
    model.train()  # dropout is 0 everywhere, so train mode computes what eval would
    head = torch.nn.Linear(width, NUM_CLASSES).to(device)
    head.requires_grad_(False)  # frozen, as ours (train_head=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=LEARNING_RATE)

    def to_torch(b):
        x = torch.from_numpy(b["inputs"])
        if not row.is_text():
            x = x.permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        return x.to(device), torch.from_numpy(b["labels"]).long().to(device)

    batches = [to_torch(b) for b in make_batches(row, batch)]
    holder = {"i": 0, "loss": None}

    def call():
        x, y = batches[holder["i"] % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head(forward(model, x)), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        holder["loss"] = loss
        holder["i"] += 1

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    start = time.perf_counter()
    call()
    sync()
    first = time.perf_counter() - start
    start = time.perf_counter()
    call()
    sync()
    step = time.perf_counter() - start
    steps = max(1, math.ceil(window_s / step))
    times = common.timed_windows(call, windows=windows, steps=steps, sync=sync)
    return {"times": times, "steps_per_window": steps, "compile_s": first - step,
            "loss": float(holder["loss"]), "note": note, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": device}


# ----------------------------------------------------------------------------
# Equivalence checks (before timing)
# ----------------------------------------------------------------------------

VIT_LOGITS_TOL = 5e-6  # max |Δlogit| in float32; measured 1.4e-6 (logits up to 2.4)
MINILM_HIDDEN_TOL = 2e-5  # max |Δ| of last hidden states (real weights); measured 3.7e-6 (values up to 6)


def check_worker(row: Row) -> dict:
    """Same weights, same inputs: do both sides compute the same function?"""
    import jax
    import torch

    from atm_jax.models import heads

    torch.set_num_threads(common.cpu_count())
    b = make_batches(row, 8 if row.model == "vit_tiny" else 4, count=1, seed=123)[0]
    if row.model == "vit_tiny":
        apply_fn, params, width, _ = jax_model(row, seed=3)
        # Non-zero biases and class token, so a mis-mapped bias or token shows.
        rng = np.random.default_rng(7)
        params = jax.tree.map(lambda a: np.asarray(a) + 0.05 * rng.standard_normal(a.shape)
                              .astype(np.float32), params)
        head = jax.tree.map(np.asarray, heads.init_head(jax.random.key(1), width, NUM_CLASSES))
        ours = np.asarray(heads.apply_head(head, apply_fn(params, b["inputs"], False)))
        twin = torch_vit_twin(params)
        with torch.no_grad():
            x = torch.from_numpy(b["inputs"]).permute(0, 3, 1, 2)
            feats = twin(x).numpy()
        theirs = feats @ head["kernel"] + head["bias"]
        diff, tol, what = float(np.abs(ours - theirs).max()), VIT_LOGITS_TOL, "logits"
        scale = float(np.abs(theirs).max())
    else:  # MiniLM, real weights on both sides
        import transformers

        from atm_jax.models import bert, hf

        folder = minilm_folder()
        if folder is None:
            return {"skipped": "all-MiniLM-L6-v2 weights unavailable"}
        checkpoint = hf.load(folder)
        encoder = bert.encoder(checkpoint.config)
        t = b["inputs"]
        ours = np.asarray(encoder.apply({"params": checkpoint.params}, t[:, 0], t[:, 1],
                                        t[:, 2])[0])
        model = transformers.BertModel.from_pretrained(str(folder)).eval()
        with torch.no_grad():
            x = torch.from_numpy(t)
            theirs = model(input_ids=x[:, 0], attention_mask=x[:, 1],
                           token_type_ids=x[:, 2]).last_hidden_state.numpy()
        diff, tol, what = float(np.abs(ours - theirs).max()), MINILM_HIDDEN_TOL, "last hidden states"
        scale = float(np.abs(theirs).max())
    return {"what": what, "max_abs_diff": diff, "tolerance": tol, "max_abs_value": scale,
            "ok": diff <= tol}


# ----------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------


def _measure(kind: str, row: Row, batch: int, args) -> dict | None:
    return common.run_worker(__file__, ["--worker", kind, "--rows", row.name, "--batch",
                                        str(batch), "--windows", str(args.windows),
                                        "--window-s", str(args.window_s),
                                        "--torch-device", args.torch_device])


def _throughput(result: dict | None, batch: int) -> float | None:
    return None if result is None else batch / common.median(result["times"])


def _spread(result: dict | None, batch: int) -> str:
    if result is None:
        return "–"
    rates = [batch / t for t in result["times"]]
    return f"{min(rates):.1f}–{max(rates):.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="", help=f"comma-separated, from {list(ROWS)} (default: all)")
    parser.add_argument("--windows", type=int, default=5, help="timed windows per measurement")
    parser.add_argument("--window-s", type=float, default=3.0,
                        help="target seconds per window (at least one step)")
    parser.add_argument("--quick", action="store_true",
                        help=f"rows {','.join(QUICK_ROWS)} (unless --rows), 3 windows of ~1 s")
    parser.add_argument("--jax-only", action="store_true",
                        help="time only our step; torch is never imported")
    parser.add_argument("--device-note", default="", help="what the accelerator is, for the header")
    parser.add_argument("--torch-device", default="cpu",
                        help='PyTorch device ("cuda" to compare on a GPU; default "cpu")')
    parser.add_argument("--batch-scale", type=int, default=1,
                        help="multiply every row's batch (bigger batches for accelerators)")
    parser.add_argument("--note", action="append", default=[],
                        help="a line for the results header (repeatable), e.g. who else used the cores")
    parser.add_argument("--no-check", action="store_true", help="skip the equivalence checks")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--worker", choices=["jax", "torch", "check"], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        row = ROWS[args.rows]
        if args.worker == "check":
            out = check_worker(row)
        elif args.worker == "jax":
            out = jax_worker(row, args.batch, args.windows, args.window_s)
        else:
            out = torch_worker(row, args.batch, args.windows, args.window_s, args.torch_device)
        print(json.dumps(out))
        return

    if args.quick:
        args.windows, args.window_s = min(args.windows, 3), 1.0
    names = [n for n in args.rows.split(",") if n] or (list(QUICK_ROWS) if args.quick else list(ROWS))
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    if args.batch_scale < 1:
        parser.error(f"--batch-scale={args.batch_scale} must be >= 1")
    started = time.perf_counter()

    checks = {}
    if not args.jax_only and not args.no_check:
        for name in dict.fromkeys("vit_tiny" if ROWS[n].model == "vit_tiny" else "minilm_s64"
                                  for n in names if ROWS[n].model in ("vit_tiny", "minilm")):
            result = common.run_worker(__file__, ["--worker", "check", "--rows", name])
            checks[ROWS[name].model] = result
            if result is None:
                sys.exit(f"equivalence check for {name} failed to run; see above")
            if "skipped" in result:
                print(f"check {name}: skipped ({result['skipped']})")
                continue
            print(f"check {name}: max |Δ {result['what']}| = {result['max_abs_diff']:.2e} "
                  f"(tolerance {result['tolerance']:.0e}, values up to {result['max_abs_value']:.2f})")
            if not result["ok"]:
                sys.exit(f"{name}: the PyTorch side does not compute our function; not timing it")

    results = []
    for name in names:
        row = ROWS[name]
        batch = row.batch * args.batch_scale
        print(f"{name} (batch {batch}) ...", flush=True)
        ours = _measure("jax", row, batch, args)
        theirs = None if args.jax_only else _measure("torch", row, batch, args)
        for side, r in (("ours", ours), ("torch", theirs)):
            if r is not None:
                print(f"  {side}: {_throughput(r, batch):.2f} ex/s (windows {_spread(r, batch)}, "
                      f"{r['steps_per_window']} steps each, first step +{r['compile_s']:.1f} s)",
                      flush=True)
        results.append((row, batch, ours, theirs))
    elapsed = time.perf_counter() - started

    if args.jax_only:
        lines = ["| row | batch | ours ex/s | windows ex/s | step ms | compile s | compiles | weights |",
                 "|---|---:|---:|---:|---:|---:|---:|---|"]
        for row, batch, ours, _ in results:
            if ours is None:
                lines.append(f"| {row.label} | {batch} | failed | | | | | |")
                continue
            lines.append(f"| {row.label} | {batch} | {_throughput(ours, batch):.1f} | "
                         f"{_spread(ours, batch)} | {1000 * common.median(ours['times']):.1f} | "
                         f"{ours['compile_s']:.1f} | {ours['compiles']} | {ours['note']} |")
    else:
        lines = ["| row | batch | ours ex/s | PyTorch ex/s | ours ÷ PyTorch | ours windows | "
                 "PyTorch windows | ours compile s | weights |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for row, batch, ours, theirs in results:
            a, b = _throughput(ours, batch), _throughput(theirs, batch)
            ratio = f"{a / b:.2f}×" if a and b else "–"
            fa = f"{a:.2f}" if a else "failed"
            fb = f"{b:.2f}" if b else "failed"
            compile_s = f"{ours['compile_s']:.1f}" if ours else "–"
            note = (ours or theirs or {}).get("note", "")
            lines.append(f"| {row.label} | {batch} | {fa} | {fb} | {ratio} | {_spread(ours, batch)} | "
                         f"{_spread(theirs, batch)} | {compile_s} | {note} |")
    table = "\n".join(lines)
    print()
    print(table)
    print(f"\n{elapsed / 60:.1f} min in all")
    if args.no_write:
        return

    first = next((r[2] for r in results if r[2]), {})
    header = [common.versions("jax", "flax", "optax", "numpy",
                              *([] if args.jax_only else ["torch", "transformers"]))]
    header.append(f"jax.devices(): {', '.join(first.get('devices', ['?']))}"
                  + (f"; {args.device_note}" if args.device_note else ""))
    if not args.jax_only:
        threads = next((r[3]["threads"] for r in results if r[3]), "?")
        header.append(f"PyTorch device: {args.torch_device}; threads: {threads} "
                      "(the cores this process may use)")
    header += [
        f"ex/s = batch ÷ median seconds per step over {args.windows} timed windows of "
        f"≥ {args.window_s:g} s each (at least one step), after compile + one warm-up step; "
        "each measurement in its own process; ours and PyTorch alternate row by row",
        f"both sides: Adam lr {LEARNING_RATE:g}, clip at global norm {GRAD_CLIP:g}, frozen linear "
        f"head ({NUM_CLASSES} classes) on pooled/class-token features, cross-entropy, no dropout, "
        "float32, the same 3 host batches cycled",
        f"batch scale {args.batch_scale}; whole run {elapsed / 60:.1f} min",
    ]
    for model, c in checks.items():
        if c and "skipped" not in c:
            header.append(f"check {model}: same weights and inputs, max |Δ {c['what']}| = "
                          f"{c['max_abs_diff']:.2e} (tolerance {c['tolerance']:.0e}; values up to "
                          f"{c['max_abs_value']:.2f})")
    header += args.note
    path = common.write_results("train_bench", header, table)
    print(f"wrote {path.relative_to(common.ROOT)}")


if __name__ == "__main__":
    main()
