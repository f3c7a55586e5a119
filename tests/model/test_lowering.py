"""What the train steps, a sweep step and prior sampling lower to on GPU and TPU.

Exported from this CPU host with ``jax.export(..., platforms=[...])`` (the CPU jaxlib
lowers for cuda and tpu), so CI checks the accelerator programs without one:

* XLA's own convolutions (``conv_impl="auto"``), no per-tap / phase kernel-gradient
  matmuls: every ``dot_general`` is a Dense layer's;
* no host callbacks or other custom calls (CPU-only or not);
* ``chain_dtype="bfloat16"``: bf16 only inside the chain's while loop;
* under ``shard_map``: the all-reduces after the chain loop, none inside it;
* a sweep on GPU/TPU vmaps its members (no ``lax.map`` loop of the CPU rule), and
  with one member per device runs no grouped convolutions.

Shapes are small (28x28x1, batch 4, T = 2): these look at programs, not numbers.
"""

import collections
import functools
import re

import jax
import jax.numpy as jnp
import pytest

from lpc_jax.evaluation import bounds
from lpc_jax.model import networks, steps
from lpc_jax.model.state import create_train_state
from lpc_jax.runtime import distributed
from lpc_jax.sampling import langevin
from lpc_jax.training import build, sweep
from lpc_jax.training.config import Config

SHAPE = (28, 28, 1)
BATCH = 4
PLATFORMS = ("cuda", pytest.param("tpu", marks=pytest.mark.slow))  # CI runs both (-m slow too)
# The networks' Dense layers: decoder Dense(256) and encoder Dense(80), forward and
# backward (input and kernel gradients). Nothing else in a step is a matmul.
LPC_DOTS, VAE_DOTS, PRIOR_DOTS = 9, 6, 1
HEAVY_OPS = ("convolution", "dot_general", "transpose", "concatenate", "pad", "slice", "reverse", "reshape",
             "while", "reduce")


def _config(**kw) -> Config:
    return Config(num_steps=2, batch_size=BATCH, **kw)


@functools.lru_cache(maxsize=None)
def _setup(conv_impl: str = "auto", chain_dtype: str = "float32"):
    config = _config(conv_impl=conv_impl, chain_dtype=chain_dtype)
    model = build.build_model(config)
    state = create_train_state(jax.random.key(0), model, SHAPE, config.latent_dim)
    return config, model, state


def _x():
    return jnp.zeros((BATCH, *SHAPE), jnp.float32)


def _export(fn, args, platform: str) -> str:
    text = jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()
    return re.sub(r"^#loc.*\n", "", text, flags=re.M)  # the source locations (Python names)


@functools.lru_cache(maxsize=None)
def _program(name: str, platform: str, conv_impl: str = "auto", chain_dtype: str = "float32") -> str:
    """StableHLO text of one of the programs a run executes, exported for ``platform``."""
    config, model, state = _setup(conv_impl, chain_dtype)
    key, hp = jax.random.key(1), langevin.hparams(0.1, 0.9, 1e-8)
    if name == "lpc":
        return _export(build.make_train_step(config, model), (state, _x(), key, hp), platform)
    if name == "vae":
        return _export(functools.partial(steps.vae_train_step, model=model), (state, _x(), key), platform)
    if name == "prior":
        decode = lambda p, z: networks.decode_mean(model.decoder, p, z)
        return _export(decode, (state.params["decoder"], jnp.zeros((BATCH, config.latent_dim))), platform)
    if name == "sweep":
        states = sweep.stack_trees([state, state])
        hps = langevin.stack_hparams([0.1, 0.2], [0.9, 0.9], 1e-8)
        step = sweep.make_sweep_step(config, model)  # mode="auto"
        return _export(step, (states, _x(), jax.random.split(key, 2), hps), platform)
    raise ValueError(name)


def op_counts(text: str) -> collections.Counter:
    """``stablehlo.<op>`` occurrences by op name."""
    return collections.Counter(re.findall(r"stablehlo\.([a-z_]+)", text))


def grouped_convolutions(text: str) -> int:
    """Convolutions with a feature or batch group count above 1."""
    return sum(int(n) > 1 for n in re.findall(r"(?:feature|batch)_group_count = (\d+)", text))


def functions(text: str) -> dict[str, str]:
    """The module's functions, name -> text."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"func\.func (?:public |private )?@([\w.$-]+)", text)]
    return {name: text[s: e] for (s, name), (e, _) in zip(starts, starts[1:] + [(len(text), "")])}


def _region_end(text: str, open_at: int) -> int:
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    raise ValueError("unbalanced braces")


def loop_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each outermost ``stablehlo.while`` (its cond and body regions)."""
    spans = []
    for m in re.finditer(r"stablehlo\.while\(", text):
        if any(s <= m.start() < e for s, e in spans):
            continue
        cond = text.index(" cond {", m.start()) + len(" cond ")
        body = text.index(" do {", _region_end(text, cond)) + len(" do ")
        spans.append((m.start(), _region_end(text, body)))
    return spans


def split_by_loop(text: str) -> tuple[str, str]:
    """(inside, outside): the text inside while loops, with the functions only they
    call (transitively), and everything else."""
    funcs = functions(text)
    inside, outside = [], []
    for body in funcs.values():
        spans = loop_spans(body)
        inside += [body[s:e] for s, e in spans]
        rest, last = [], 0
        for s, e in spans:
            rest.append(body[last:s])
            last = e
        outside.append("".join(rest) + body[last:])
    called = lambda chunks: set(re.findall(r"call @([\w.$-]+)", "".join(chunks)))
    out_funcs, frontier = set(), {"main"}
    while frontier:  # functions reachable from outside the loops
        out_funcs |= frontier
        frontier = called(outside[i] for i, n in enumerate(funcs) if n in frontier) - out_funcs
    in_text = "".join(inside) + "".join(funcs[n] for n in funcs if n not in out_funcs)
    out_text = "".join(outside[i] for i, n in enumerate(funcs) if n in out_funcs)
    return in_text, out_text


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("name, dots, convs", [("lpc", LPC_DOTS, 44), ("vae", VAE_DOTS, 29),
                                               ("prior", PRIOR_DOTS, 5)])
def test_accelerator_programs_use_xla_convolutions(name, dots, convs, platform):
    """Old code (the CPU-tuned layers everywhere), cuda: lpc 102 dot_generals / 54 convs /
    44 transposes / 38 concatenates / 66 pads; vae 96 / 30; prior 2 / 10."""
    ops = op_counts(_program(name, platform))
    assert ops["dot_general"] == dots, ops  # no per-tap or phase kernel-gradient matmuls
    assert ops["convolution"] == convs, ops  # one per forward conv, two per backward (cuDNN's)
    assert ops["concatenate"] <= 3 and ops["pad"] == 0, ops  # no sub-pixel / space-to-depth plumbing
    xla = op_counts(_program(name, platform, "xla"))
    # (platform_dependent adds its index resolution: case, return, constant ops.)
    assert {op: ops[op] for op in HEAVY_OPS} == {op: xla[op] for op in HEAVY_OPS}


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("name", ["lpc", "vae", "prior", "sweep"])
def test_no_host_callbacks_or_custom_calls(name, platform):
    text = _program(name, platform)
    assert re.findall(r"stablehlo\.custom_call @?\"?([\w.]+)", text) == []
    # Host callbacks lower to custom calls (xla_python_*_callback), or to host transfers:
    assert not {"infeed", "outfeed", "send", "recv"} & set(op_counts(text))


def test_cpu_still_lowers_the_tuned_layers():
    ops = op_counts(_program("lpc", "cpu"))
    assert ops["dot_general"] > LPC_DOTS, ops  # the kernel-gradient matmuls of layers.py


@pytest.mark.parametrize("platform", PLATFORMS)
def test_bf16_only_inside_the_chain(platform):
    text = _program("lpc", platform, chain_dtype="bfloat16")
    inside, outside = split_by_loop(text)
    assert "bf16" in inside
    assert "bf16" not in outside
    assert op_counts(inside)["convolution"] > 0  # the decoder's VJP is in the loop
    assert "bf16" not in _program("lpc", platform)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_sweep_vmaps_its_members_on_accelerators(platform):
    """Old code: mode "auto" resolved on this host (map: a lax.map loop over the members,
    2 while loops) and the layers' vmap rule looped on the host's CPU (36 with "vmap")."""
    text = _program("sweep", platform)
    assert op_counts(text)["while"] == 1  # the chain's scan; no member loop
    assert grouped_convolutions(text) > 0  # JAX's vmap rule: the members batched
    assert op_counts(_program("sweep", "cpu"))["while"] > 1  # CPU: lax.map over the members


@pytest.mark.parametrize("platform", PLATFORMS)
def test_one_member_per_device_has_no_grouped_convolutions(platform):
    config, model, state = _setup()
    counts = {}
    for k in (1, 2):
        states = sweep.stack_trees([state] * k)
        step = sweep.make_sweep_step(config, model, mode="vmap", mesh=distributed.mesh(1))
        args = (states, _x(), jax.random.split(jax.random.key(1), k), langevin.stack_hparams([0.1] * k, [0.5] * k))
        counts[k] = grouped_convolutions(_export(step, args, platform))
    assert counts[1] == 0 and counts[2] > 0, counts


@pytest.mark.parametrize("platform", PLATFORMS)
def test_sharded_chain_all_reduces_after_its_loop_only(platform):
    config, model, state = _setup()
    mesh = jax.sharding.AbstractMesh((4,), ("data",))
    step = build.make_train_step(config, model, mesh)
    text = _export(step, (state, _x(), jax.random.key(1), langevin.hparams(0.1, 0.9, 1e-8)), platform)
    main = functions(text)["main"]
    (loop,) = loop_spans(main)
    reduces = [m.start() for m in re.finditer(r"stablehlo\.all_reduce", main)]
    assert reduces and all(r > loop[1] for r in reduces), (loop, reduces)
    assert op_counts(split_by_loop(text)[0])["all_reduce"] == 0


def _precisions(text: str) -> collections.Counter:
    """The ``precision_config`` entries of the program's dot_generals and convolutions."""
    pretty = [p for pair in re.findall(r"precision = \[(\w+), (\w+)\]", text) for p in pair]  # dot_general
    return collections.Counter(re.findall(r"#stablehlo<precision (\w+)>", text) + pretty)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_bounds_run_at_highest_precision_and_training_at_the_default(platform):
    """Under a "default" precision setting (tests/conftest.py sets "highest" for the
    suite), the test ELBO and the IWAE bound still run every matmul and convolution at
    HIGHEST; the train step stays at the default (TF32 / bf16 passes on GPU/TPU)."""
    config, model, state = _setup()
    key = jax.random.key(1)
    with jax.default_matmul_precision("default"):
        elbo = jax.export.export(bounds._elbo_batch, platforms=[platform])(state.params, _x(), key, model=model)
        iwae = jax.export.export(bounds._iwae_batch, platforms=[platform])(
            state.params, _x(), key, model=model, num_samples=4, chunk_size=2)
        train = _export(build.make_train_step(config, model), (state, _x(), key, langevin.hparams(0.1, 0.9)),
                        platform)
    for text in (elbo.mlir_module(), iwae.mlir_module()):
        ops = op_counts(text)
        assert _precisions(text) == {"HIGHEST": 2 * (ops["dot_general"] + ops["convolution"])}
    assert "HIGHEST" not in _precisions(train)
