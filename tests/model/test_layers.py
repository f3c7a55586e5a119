"""The custom-VJP conv layers against the plain flax layers (outputs and gradients)."""

from __future__ import annotations

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpc_jax.model import layers, networks

IMAGE_SHAPES = ((64, 64, 3), (32, 32, 1), (28, 28, 1))


def _layer_cases():
    """(kind, (features, kernel, stride, padding), input shape) for every layer of networks.py."""
    cases = []
    for shape in IMAGE_SHAPES:
        h, c = 1, 256  # the decoder's Dense(256) output reshaped to 1x1
        for spec in networks._decoder_layers(shape):
            cases.append(("transpose", spec, (2, h, h, c)))
            f, k, s, p = spec
            h, c = (h - 1) * s + k - 2 * p, f
        h, c = shape[0], shape[2]
        for spec in networks._encoder_layers(shape):
            cases.append(("conv", spec, (2, h, h, c)))
            f, k, s, p = spec
            h, c = (h + 2 * p - k) // s + 1, f
    return sorted(set(cases))


# Beyond networks.py: non-square inputs, rows a strided conv never reads, stride 3, stride > kernel.
EXTRA_CASES = [
    ("conv", (5, 3, 3, 1), (2, 10, 9, 3)),
    ("conv", (6, 4, 2, 1), (2, 11, 6, 5)),
    ("transpose", (5, 3, 3, 1), (2, 5, 4, 7)),
    ("transpose", (5, 2, 3, 0), (2, 4, 5, 3)),
]

ALL_CASES = _layer_cases() + EXTRA_CASES


def _modules(kind, spec):
    if kind == "conv":
        return layers.Conv(*spec), layers.ConvReference(*spec)
    return layers.ConvTranspose(*spec), layers.ConvTransposeReference(*spec)


def _inner_name(kind):
    return "Conv_0" if kind == "conv" else "ConvTranspose_0"


def _appliers(kind, spec):
    new, ref = _modules(kind, spec)

    def apply_new(p, x):
        return new.apply({"params": p}, x)

    def apply_ref(p, x):  # the reference layer wraps flax's nn.Conv / nn.ConvTranspose
        return ref.apply({"params": {_inner_name(kind): p}}, x)

    return new, ref, apply_new, apply_ref


def _inputs(kind, spec, x_shape, seed=0):
    """Input, parameters (shaped by ``init``, non-zero bias) and an output cotangent.

    Drawn with numpy: jax.random inside the compiled functions would dominate compile time.
    """
    new, _, _, apply_ref = _appliers(kind, spec)
    rng = np.random.default_rng(seed)
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    shapes = jax.eval_shape(new.init, jax.random.key(0), x)["params"]
    fan_in = float(np.prod(shapes["kernel"].shape[:-1]))
    params = {"kernel": rng.normal(size=shapes["kernel"].shape) / np.sqrt(fan_in),
              "bias": 0.1 * rng.normal(size=shapes["bias"].shape)}
    y_shape = jax.eval_shape(apply_ref, params, x).shape
    as32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return as32(rng.normal(size=x_shape)), jax.tree.map(as32, params), as32(rng.normal(size=y_shape))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _outputs_and_grads(kind, spec, x, params, cot):
    """(y, (d params, d x)) of both implementations for one cotangent, in one compile."""
    _, _, apply_new, apply_ref = _appliers(kind, spec)
    results = []
    for apply in (apply_new, apply_ref):
        y, vjp = jax.vjp(apply, params, x)
        results.append((y, vjp(cot)))
    return results


def _run_quickly(fn, *args, static=0):
    """``fn(*args)`` for a jitted ``fn``, compiled with LLVM optimisations off (about half the
    compile time; the XLA graph passes, and so the convolutions chosen, are unchanged)."""
    compiled = fn.lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})
    return compiled(*args[static:])


def _assert_close(actual, expected, tol=1e-5):
    """rtol 1e-5 and atol 1e-5 relative to each leaf's largest magnitude (float32 sums of many terms)."""
    def check(a, e):
        a, e = np.asarray(a), np.asarray(e)  # numpy: eager jnp ops would compile per shape
        np.testing.assert_allclose(a, e, rtol=tol, atol=tol * max(1.0, float(np.abs(e).max())))
    chex.assert_trees_all_equal_shapes(actual, expected)
    jax.tree.map(check, actual, expected)


@pytest.mark.parametrize("kind,spec,x_shape", ALL_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_outputs_and_gradients_match_flax(kind, spec, x_shape):
    new, ref, _, _ = _appliers(kind, spec)
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    ours = jax.eval_shape(new.init, jax.random.key(0), x)["params"]
    theirs = jax.eval_shape(ref.init, jax.random.key(0), x)["params"][_inner_name(kind)]
    chex.assert_trees_all_equal_shapes_and_dtypes(ours, theirs)  # drop-in: same names, shapes

    x, params, cot = _inputs(kind, spec, x_shape)
    new_out, ref_out = _run_quickly(_outputs_and_grads, kind, spec, x, params, cot, static=2)
    (y_new, (gp_new, gx_new)), (y_ref, (gp_ref, gx_ref)) = new_out, ref_out
    _assert_close(y_new, y_ref)
    _assert_close(gx_new, gx_ref)  # input
    _assert_close(gp_new["kernel"], gp_ref["kernel"])
    _assert_close(gp_new["bias"], gp_ref["bias"])


@pytest.mark.parametrize("kind,spec,x_shape", [
    ("transpose", (32, 4, 2, 1), (2, 6, 6, 64)),  # one conv per output phase
    ("conv", (32, 4, 2, 1), (2, 28, 28, 1)),  # its dx: a transposed conv, phases merged into one conv
], ids=["transpose", "conv"])
def test_vmap(kind, spec, x_shape):
    """vmap over a leading axis of parameters and inputs (a hyperparameter sweep), of
    parameters only, and of inputs only: the layers' batching rules (a loop over the
    vmapped axis / folding it into the batch) against flax's autodiff under vmap."""
    x, params, cot = _inputs(kind, spec, x_shape)
    rng = np.random.default_rng(1)
    vparams = jax.tree.map(lambda a: jnp.asarray(np.asarray(a) + 0.05 * rng.normal(size=(3,) + a.shape), jnp.float32),
                           params)
    vx = jnp.asarray(np.stack([x, -x, 2.0 * x]), jnp.float32)
    vcot = jnp.asarray(np.stack([cot, 0.5 * cot, -cot]), jnp.float32)  # batched cotangents too
    in_axes = ((0, 0, 0), (0, None, 0), (None, 0, 0))

    @jax.jit
    def run(params, x, vparams, vx):
        _, _, apply_new, apply_ref = _appliers(kind, spec)

        def outputs_and_grads(apply):
            def one(p, x, c):
                y, vjp = jax.vjp(apply, p, x)
                return y, vjp(c)
            return one

        out = {}
        for axes in in_axes:
            args = (vparams if axes[0] == 0 else params, vx if axes[1] == 0 else x, vcot)
            out[str(axes)] = tuple(jax.vmap(outputs_and_grads(apply), in_axes=axes)(*args)
                                   for apply in (apply_new, apply_ref))
        single_new = outputs_and_grads(apply_new)(jax.tree.map(lambda a: a[1], vparams), vx[1], vcot[1])
        return out, single_new

    out, single_new = _run_quickly(run, params, x, vparams, vx)
    for axes in in_axes:
        _assert_close(*out[str(axes)])
    _assert_close(jax.tree.map(lambda a: a[1], out[str((0, 0, 0))][0]), single_new)


def _decoder_chain(decoder, x, steps):
    """A rolled lax.scan of Langevin-like steps: grad of the summed log joint w.r.t. (params, z)."""
    log_joint = networks.make_log_joint(decoder)

    def chain(params, z):
        def body(carry, _):
            z, acc = carry
            gp, gz = jax.grad(lambda p, z: log_joint(p, x, z).sum(), argnums=(0, 1))(params, z)
            return (z + 1e-3 * gz, jax.tree.map(jnp.add, acc, gp)), None
        init = (z, jax.tree.map(jnp.zeros_like, params))
        return jax.lax.scan(body, init, None, length=steps)[0]

    return jax.jit(chain)


def _numpy_init(module, rng, *args):
    """``module.init``'s parameter tree filled with numpy draws (kernels ~ N(0, 1 / fan_in))."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]

    def draw(path, leaf):
        if jax.tree_util.keystr(path).endswith("['log_scale']"):
            return jnp.full(leaf.shape, np.log(0.1), jnp.float32)
        scale = 1.0 / np.sqrt(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0.1
        return jnp.asarray(scale * rng.normal(size=leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def chain_28():
    """The 28x28 decoder's chain (3 rolled steps, batch 4), compiled once; its inputs."""
    shape, batch = (28, 28, 1), 4
    decoder = networks.Decoder(shape)
    rng = np.random.default_rng(2)
    z = jnp.asarray(rng.normal(size=(batch, 40)), jnp.float32)
    x = jnp.asarray(np.round(np.clip(0.5 * rng.normal(size=(batch,) + shape), -1, 1) * 127.5) / 127.5, jnp.float32)
    params = _numpy_init(decoder, rng, z)
    compiled = _decoder_chain(decoder, x, steps=3).lower(params, z).compile()
    return compiled, shape, x, params, z


def test_decoder_chain_in_scan_matches_reference(chain_28):
    """The tuned decoder's rolled chain against the same decoder on XLA's own
    convolutions (``conv_impl="xla"``: flax's ``nn.ConvTranspose``, same parameters)."""
    compiled, shape, x, params, z = chain_28
    z_new, acc_new = compiled(params, z)
    with jax.default_matmul_precision("highest"):
        z_ref, acc_ref = _run_quickly(_decoder_chain(networks.Decoder(shape, conv_impl="xla"), x, steps=3), params, z)
    _assert_close(z_new, z_ref, tol=1e-4)
    _assert_close(acc_new, acc_ref, tol=1e-4)


_SLOW_CONV = re.compile(r"outer_dimension_partitions|rhs_reversal|lhs_dilate|rhs_dilate")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="inspects XLA:CPU's compiled HLO")
def test_scan_body_has_only_canonical_convolutions(chain_28):
    """Every convolution XLA:CPU compiles for the decoder's chain step (rolled scan) and for
    the encoder's gradient is NHWC x HWIO -> NHWC without reversal or dilation, i.e. one the
    Eigen/YNNPACK kernels run; the others become naive loop nests inside while bodies."""
    compiled, shape, x, _, z = chain_28
    encoder = networks.Encoder(shape)
    pe = _numpy_init(encoder, np.random.default_rng(3), x)

    def enc_step(pe, _):
        grad = jax.grad(lambda pe: networks.gaussian_log_prob_diag(z, *encoder.apply({"params": pe}, x)).sum())(pe)
        return jax.tree.map(lambda a, b: a + 1e-3 * b, pe, grad), None

    hlo = compiled.as_text()
    hlo += jax.jit(lambda pe: jax.lax.scan(enc_step, pe, None, length=2)[0]).lower(pe).compile().as_text()
    convs = [re.sub(r", metadata=\{[^}]*\}", "", line) for line in hlo.splitlines() if " convolution(" in line]
    assert len(convs) >= 10
    bad = [line for line in convs if _SLOW_CONV.search(line) or "dim_labels=b01f_01io->b01f" not in line]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("platform, loops, grouped", [("cpu", True, False), ("cuda", False, True),
                                                     ("tpu", False, True)])
def test_vmap_rule_follows_the_lowering_platform(platform, loops, grouped):
    """Per-member weights under vmap: a loop over the members on CPU; JAX's grouped
    convolutions on GPU/TPU, decided for the platform the program is exported for (the
    old rule asked the host's ``jax.default_backend()``: exported for cuda from a CPU
    host it looped)."""
    kind, spec, x_shape = "conv", (64, 3, 2, 1), (2, 6, 6, 64)
    x, params, cot = _inputs(kind, spec, x_shape)
    vparams = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), params)
    _, _, apply_new, _ = _appliers(kind, spec)
    grads = jax.vmap(lambda p, x, c: jax.vjp(apply_new, p, x)[1](c))  # members: weights, inputs, cotangents
    args = vparams, jnp.stack([x, -x]), jnp.stack([cot, 2 * cot])
    text = jax.export.export(jax.jit(grads), platforms=[platform])(*args).mlir_module()
    assert ("stablehlo.while" in text) == loops
    assert bool(re.search(r"(?:feature|batch)_group_count = [2-9]", text)) == grouped


@pytest.mark.parametrize("s,k,u,v", [
    (2, 4, 16, 16),  # phase form: (P Q) / (U V) = 289 / 256
    (2, 4, 3, 3),  # one matmul per tap: 16 / 9 > layers._PHASE_MAX_PAD_RATIO
    (1, 3, 20, 20),  # stride 1: nine shifts, no space-to-depth
    (2, 3, 15, 13),  # k not a multiple of s: the phase form's extra taps are cropped
    (3, 2, 6, 4),  # stride > kernel: taps that exist for no phase
])
@pytest.mark.parametrize("ca,cg", [(5, 3), (2, 24)], ids=["shift_g", "shift_a"])  # which operand is shifted
def test_kernel_grad_is_its_defining_sum(s, k, u, v, ca, cg):
    """``_kernel_grad(a, g)[i, j] = sum_{n,u,v} a[n, s u + i, s v + j]^T g[n, u, v]``, by numpy,
    with ``a`` one row and column longer than any tap reaches (the phase form crops them)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, s * (u - 1) + k + 1, s * (v - 1) + k + 1, ca)).astype(np.float32)
    g = rng.normal(size=(3, u, v, cg)).astype(np.float32)
    expected = np.zeros((k, k, ca, cg))
    for i in range(k):
        for j in range(k):
            window = a[:, i: i + s * (u - 1) + 1: s, j: j + s * (v - 1) + 1: s]
            expected[i, j] = np.einsum("nuva,nuvb->ab", window.astype(np.float64), g.astype(np.float64))
    actual = jax.jit(layers._kernel_grad, static_argnums=(2, 3))(a, g, s, k)
    _assert_close(actual, expected)


@pytest.mark.parametrize("s,k,p,h,ci", [
    (2, 4, 1, 12, 3),  # space-to-depth: the 64x64x3 decoder's last input gradient, smaller
    (2, 4, 1, 9, 1),  # odd size: the last row is read by no output
    (2, 3, 1, 8, 2),  # k not a multiple of s: zero taps in the phase blocks
    (3, 3, 1, 10, 1),  # the encoder's first 64x64 layer's stride
    (2, 4, 1, 8, 8),  # s * s * ci > 16: the strided conv itself
])
def test_strided_conv_equals_lax(s, k, p, h, ci):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, h, h + 1, ci)).astype(np.float32)
    w = rng.normal(size=(k, k, ci, 6)).astype(np.float32)
    expected = jax.lax.conv_general_dilated(x, w, (s, s), ((p, p), (p, p)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            precision=jax.lax.Precision.HIGHEST)
    _assert_close(jax.jit(layers._strided_conv, static_argnums=(2, 3))(x, w, s, p), expected)
