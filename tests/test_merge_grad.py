"""Gradients through the merges, against central finite differences of NumPy references.

The references are written from the papers, not from the library: TIES (Yadav et
al. 2023) trims each task to its top ``density`` by magnitude (one threshold over
the whole model per task), elects the sign of the sum of the trimmed values and
takes the disjoint mean over the agreeing entries; Breadcrumbs (Davari &
Belilovsky 2024) keeps a magnitude band per tensor and takes the mean; DARE (Yu et
al. 2024) drops and rescales, then TIES' election. They run in float64, so their
central differences are exact up to rounding wherever the kept set and the elected
signs stay put, and the test points are built to sit well inside such a region.

The differentiated function is AdaMerging-style: ``loss(merge(lam_t * tau_t))``,
differentiated in both the task vectors ``tau`` and the per-task coefficients ``lam``.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atm_jax import merge

SHAPES = {"b": (5,), "w": (4, 5)}  # jax.tree.leaves order: "b", then "w"
NUM_TASKS = 3
N = sum(math.prod(s) for s in SHAPES.values())  # entries per task vector
UNIT = 1 / 64  # every scaled value is an odd multiple of UNIT * 2**t (see _task_vectors)
LAM = np.array([0.75, 1.25, 1.5], np.float32)
H = 1e-4  # finite-difference step, in the inputs' units

DENSITY = 0.4  # TIES keeps 10 of the 25 entries per task
BETA, GAMMA = 0.2, 0.8  # Breadcrumbs per tensor: w keeps ranks 5..16 of 20, b 2..4 of 5
P = 0.5  # DARE: the 1/(1-p) rescale is exact
KEY = jax.random.key(7)

MERGES = {
    "ties": (merge.ties, dict(density=DENSITY)),
    "breadcrumbs": (merge.breadcrumbs, dict(beta=BETA, gamma=GAMMA)),
    "ties_atm_code": (merge.ties_atm_code, {}),
    "breadcrumbs_atm_code": (merge.breadcrumbs_atm_code, {}),
    "dare_ties": (merge.dare_ties, dict(key=KEY, p=P)),
}


def _task_vectors(seed: int = 0) -> np.ndarray:
    """Task vectors ``[T, N]`` (float32) whose scaled values ``LAM[t] * tau_t`` are
    (up to float32 rounding) odd multiples of ``UNIT * 2**t``, with random signs.

    Such values have distinct magnitudes with gaps of at least UNIT, within a task
    and across tasks; and a signed sum over any non-empty set of tasks is an odd
    multiple of its lowest ``UNIT * 2**t``, so no elected sign is near a tie.
    """
    rng = np.random.default_rng(seed)
    odd = np.stack([2 * rng.permutation(N) + 1 for _ in range(NUM_TASKS)])
    scaled = odd * UNIT * 2.0 ** np.arange(NUM_TASKS)[:, None] * rng.choice([-1, 1], odd.shape)
    return (scaled / LAM[:, None].astype(np.float64)).astype(np.float32)


def _to_tree(flat):
    """``[T, N]`` -> {"b": [T, 5], "w": [T, 4, 5]} (the inverse of :func:`_flat`)."""
    out, start = {}, 0
    for name, shape in SHAPES.items():
        size = math.prod(shape)
        out[name] = flat[:, start:start + size].reshape((flat.shape[0], *shape))
        start += size
    return out


def _flat(tree, lead: int = 1):
    return jnp.concatenate([x.reshape(x.shape[:lead] + (-1,)) for x in jax.tree.leaves(tree)], -1)


@functools.cache
def _dare_keep() -> np.ndarray:
    """DARE's kept entries ``[T, N]``, from the key derivation the merge documents."""
    masks = []
    for i, (name, shape) in enumerate(SHAPES.items()):
        leaf_key = jax.random.fold_in(KEY, i)
        masks.append(np.stack([np.asarray(jax.random.bernoulli(jax.random.fold_in(leaf_key, t),
                                                               1.0 - P, shape)).reshape(-1)
                               for t in range(NUM_TASKS)]))
    return np.concatenate(masks, axis=1)


# ----------------------------------------------------------------------------
# NumPy references in float64: x [T, N] -> (merged [N], what must not change)
# ----------------------------------------------------------------------------


def _top(mags: np.ndarray, fraction: float) -> np.ndarray:
    """Keep the ``ceil(fraction * n)`` largest of the last axis (magnitudes are distinct)."""
    k = math.ceil(Fraction(repr(fraction)) * mags.shape[-1])
    return mags >= -np.sort(-mags, axis=-1)[..., k - 1:k]


def _band(mags: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """Keep ascending ranks ``[floor(beta n), ceil(gamma n))`` of the last axis."""
    n = mags.shape[-1]
    rank = np.argsort(np.argsort(mags, axis=-1), axis=-1)
    return (rank >= math.floor(Fraction(repr(beta)) * n)) & (rank < math.ceil(Fraction(repr(gamma)) * n))


def _elect_disjoint_mean(trimmed: np.ndarray):
    sign = np.sign(trimmed.sum(0))
    agree = (trimmed != 0) & (np.sign(trimmed) == sign)
    return np.where(agree, trimmed, 0).sum(0) / np.maximum(agree.sum(0), 1), sign


def ref_ties(x):
    keep = _top(np.abs(x), DENSITY)
    merged, sign = _elect_disjoint_mean(np.where(keep, x, 0))
    return merged, (keep, sign)


def ref_breadcrumbs(x):
    tree = _to_tree(x)
    keep = np.concatenate([_band(np.abs(v.reshape(NUM_TASKS, -1)), BETA, GAMMA)
                           for v in tree.values()], axis=1)
    return np.where(keep, x, 0).mean(0), (keep,)


def ref_ties_atm_code(x, density=0.15):
    keep = _top(np.abs(x).reshape(-1), density).reshape(x.shape)  # one pooled threshold
    return np.where(keep, x, 0).mean(0), (keep,)


def ref_breadcrumbs_atm_code(x, beta=0.15, gamma=0.993):
    keep = _band(np.abs(x), beta, gamma)  # per task over the whole model
    return np.where(keep, x, 0).mean(0), (keep,)


def ref_dare_ties(x):
    merged, sign = _elect_disjoint_mean(np.where(_dare_keep(), x / (1 - P), 0))
    return merged, (sign,)


REFS = {"ties": ref_ties, "breadcrumbs": ref_breadcrumbs, "ties_atm_code": ref_ties_atm_code,
        "breadcrumbs_atm_code": ref_breadcrumbs_atm_code, "dare_ties": ref_dare_ties}

WEIGHTS = np.random.default_rng(1).normal(size=N)


def _loss_np(merged):
    return float(np.sum(WEIGHTS * merged) + 0.5 * np.sum(merged ** 2))


def _assert_margin(scaled: np.ndarray, largest_step: float) -> None:
    """No step of size ``largest_step`` can reorder two magnitudes or flip a sign."""
    mags = np.sort(np.abs(scaled).reshape(-1))
    gap = float(np.min(np.diff(mags)))
    # Sums over every non-empty set of tasks, entry by entry: the elected masses.
    subsets = [np.array([(s >> t) & 1 for t in range(NUM_TASKS)]) for s in range(1, 2 ** NUM_TASKS)]
    mass = min(float(np.min(np.abs((s[:, None] * scaled).sum(0)))) for s in subsets)
    assert gap >= 0.99 * UNIT and mass >= 0.99 * UNIT, (gap, mass)
    assert largest_step < UNIT / 20, largest_step


def _fd_reference(name: str, x: np.ndarray):
    """Central differences of the loss in ``x`` [T, N] and ``LAM`` [T], in float64.

    Asserts that no evaluation moved the kept set or an elected sign.
    """
    x, lam = x.astype(np.float64), LAM.astype(np.float64)
    _assert_margin(lam[:, None] * x, H * max(float(lam.max()), float(np.abs(x).max())))
    ref = REFS[name]
    _, fixed = ref(lam[:, None] * x)

    def loss(x, lam):
        merged, structure = ref(lam[:, None] * x)
        for got, want in zip(structure, fixed):
            np.testing.assert_array_equal(got, want)
        return _loss_np(merged)

    def central(f, v):
        grad = np.zeros_like(v)
        for i in np.ndindex(v.shape):
            step = np.zeros_like(v)
            step[i] = H
            grad[i] = (f(v + step) - f(v - step)) / (2 * H)
        return grad

    return central(lambda v: loss(v, lam), x), central(lambda v: loss(x, v), lam)


@functools.cache
def _fd(name):
    return _fd_reference(name, _task_vectors())


def _jax_merged(name: str, method: str | None):
    """``(tau, lam) -> merge(lam_t * tau_t)`` as one vector ``[N]``."""
    fn, kw = MERGES[name]
    if method is not None:
        kw = dict(kw, method=method)

    def merged(tau, lam):
        stacked = jax.tree.map(lambda v: v * lam.reshape((-1,) + (1,) * (v.ndim - 1)), tau)
        return _flat(fn(stacked, **kw), lead=0)
    return merged


def _jax_loss(name: str, method: str | None):
    merged = _jax_merged(name, method)

    def loss(tau, lam):
        m = merged(tau, lam)
        return jnp.sum(jnp.asarray(WEIGHTS, jnp.float32) * m) + 0.5 * jnp.sum(m ** 2)
    return loss


TOL = 2.5e-7  # float32 rounding, relative to the largest entry of the reference
JVP_TOL = 3e-8  # relative to the sum of |terms| of the contracted reference


def _assert_grad_close(got, want):
    got = np.asarray(got, np.float64)
    np.testing.assert_array_equal(got[want == 0], 0)  # trimmed: exactly no gradient
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL * np.max(np.abs(want)))


METHODS = ("auto", "host", "bisect", "top_k")
MODES = ("eager", "jit")
# Every selection method for the two standard magnitude merges; for the compatibility
# modes "auto", the host selection on CPU (eager, or a callback under jit); dare_ties
# selects nothing.
GRAD_CASES = ([(name, method, mode) for name in ("ties", "breadcrumbs") for method in METHODS
               for mode in MODES if (method, mode) != ("host", "jit")]
              + [(name, "auto", mode) for name in ("ties_atm_code", "breadcrumbs_atm_code")
                 for mode in MODES]
              + [("dare_ties", None, mode) for mode in MODES])


@pytest.mark.parametrize("name, method, mode", GRAD_CASES)
def test_grad_matches_finite_differences(name, method, mode):
    tau = _to_tree(jnp.asarray(_task_vectors()))
    grad = jax.grad(_jax_loss(name, method), argnums=(0, 1))
    if mode == "jit":
        grad = jax.jit(grad)
    g_tau, g_lam = grad(tau, jnp.asarray(LAM))
    want_tau, want_lam = _fd(name)
    assert np.count_nonzero(want_tau) >= 5  # kept entries carry a gradient...
    assert np.count_nonzero(want_tau == 0) >= 5  # ...trimmed ones do not
    _assert_grad_close(_flat(g_tau), want_tau)
    _assert_grad_close(g_lam, want_lam)


# Forward mode on the selection paths that callbacks or NumPy serve (bisect and top_k
# are plain JAX and covered by the reverse-mode test above).
@pytest.mark.parametrize("method, mode", [("auto", "eager"), ("auto", "jit"), ("host", "eager")])
def test_jvp_of_ties_matches_finite_differences_and_keeps_the_forward_value(method, mode):
    # Forward mode along the task vectors and the coefficients at once: the loss's
    # tangent is the finite-difference gradient contracted with the direction.
    rng = np.random.default_rng(2)
    d_tau, d_lam = rng.normal(size=(NUM_TASKS, N)), rng.normal(size=NUM_TASKS)
    tau, lam = _to_tree(jnp.asarray(_task_vectors())), jnp.asarray(LAM)
    merged_fn = _jax_merged("ties", method)
    jvp = functools.partial(jax.jvp, merged_fn)
    merged, d_merged = (jvp if mode == "eager" else jax.jit(jvp))(
        (tau, lam), (_to_tree(jnp.asarray(d_tau, jnp.float32)), jnp.asarray(d_lam, jnp.float32)))
    # Differentiating leaves the merge as it is: the same bits as the plain call.
    assert np.asarray(merged).tobytes() == np.asarray(merged_fn(tau, lam)).tobytes()
    merged, d_merged = np.asarray(merged, np.float64), np.asarray(d_merged, np.float64)
    want_tau, want_lam = _fd("ties")
    terms = np.concatenate([(want_tau * d_tau).reshape(-1), want_lam * d_lam])
    np.testing.assert_allclose((WEIGHTS + merged) @ d_merged, np.sum(terms),
                               rtol=0, atol=JVP_TOL * np.sum(np.abs(terms)))


def test_host_method_under_jit_grad_names_the_methods_that_work():
    tau = _to_tree(jnp.asarray(_task_vectors()))
    loss = _jax_loss("ties", "host")
    jax.grad(loss, argnums=1)(tau, jnp.asarray(LAM))  # eager grad: the host selection runs
    with pytest.raises(ValueError, match=r"method='host'.*under jax\.jit.*eager jax\.grad and "
                       r"jax\.jvp are fine.*'bisect' or 'top_k' \(or 'auto'\)"):
        jax.jit(jax.grad(loss, argnums=1))(tau, jnp.asarray(LAM))
