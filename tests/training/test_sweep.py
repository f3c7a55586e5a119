"""lpc_jax.training.sweep: K members in one program equal K separate runs with the same keys.

Tiny MLP networks on 6x6x1 images (batch 3, latent 5, T = 4) keep compiles short;
the real 28x28 networks against ``train.train_and_evaluate`` are the ``slow`` test.
"""

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lpc_jax.data import pipeline, sources
from lpc_jax.model.state import create_train_state
from lpc_jax.runtime import checkpoints
from lpc_jax.sampling import langevin
from lpc_jax.training import build, loop, sweep
from lpc_jax.training.config import Config
from tests import tiny_model as tiny

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPE, LATENT = tiny.SHAPE, tiny.LATENT
BATCH = 3
T = 4
CONFIG = Config(num_steps=T, batch_size=BATCH, latent_dim=LATENT, prior_init_batches=1,
                num_train_steps=5, log_every=2, learning_rate=1e-2)
STEP_SIZES = (0.01, 0.1, 0.5)
DECAYS = (0.0, 0.25, 0.99)
SEEDS = (0, 1, 2)


def tiny_model(config=CONFIG):
    return tiny.tiny_model(optax.adam(config.learning_rate))


def uint8_images(n, key=0):
    return np.asarray(jax.random.randint(jax.random.key(key), (n, *SHAPE), 0, 256), np.uint8)


_SINGLE_STEPS = {}


def single_step(config, model, precondition):
    """The plain jitted single step (compiled once per setting for the whole module)."""
    key = (config, id(model), precondition)
    if key not in _SINGLE_STEPS:
        cfg = dataclasses.replace(config, preconditioner=precondition)
        _SINGLE_STEPS[key] = (model, jax.jit(build.make_train_step(cfg, model)))
    return _SINGLE_STEPS[key][1]


def assert_close(actual, desired, rtol, atol):
    """Leafwise max |a - d| <= atol + rtol * max |d| (float32 rounding, amplified by the chain)."""
    for path, a, d in zip(jax.tree_util.tree_leaves_with_path(desired), jax.tree.leaves(actual),
                          jax.tree.leaves(desired)):
        a, d = np.asarray(a, np.float64), np.asarray(d, np.float64)
        err, scale = np.max(np.abs(a - d)), np.max(np.abs(d))
        assert err <= atol + rtol * scale, f"{jax.tree_util.keystr(path[0])}: max diff {err} (scale {scale})"


def separate_run(config, model, seed, step_size, decay, batches, precondition=True):
    """A loop of the plain jitted single step with train.py's keys: state, per-step metrics."""
    init_key, step_key, _, _ = loop.run_keys(seed)
    state = loop.init_state(init_key, model, SHAPE, LATENT)  # as train.py
    step_fn = single_step(config, model, precondition)
    hp = langevin.hparams(step_size, decay, config.eps)
    out = []
    for step, x in enumerate(batches):
        state, metrics = step_fn(state, jnp.asarray(x), jax.random.fold_in(step_key, step), hp)
        out.append(jax.device_get(metrics))
    return state, out


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def sweep_steps(model):
    """{mode: jitted sweep step}, K = 3; each may be traced (compiled) only once in this module."""
    chex.clear_trace_counter()
    out = {}
    for mode in sweep.SWEEP_MODES:
        fn = sweep.make_sweep_step(CONFIG, model, mode=mode)

        def step(*args, fn=fn):
            return fn(*args)

        step.__name__ = f"sweep_step_{mode}"  # chex counts traces per (source, name)
        out[mode] = jax.jit(chex.assert_max_traces(step, n=1))
    return out


@pytest.fixture(scope="module")
def batches():
    return [sources.to_float(uint8_images(BATCH, key=i)) for i in range(3)]


@pytest.mark.parametrize("mode", sweep.SWEEP_MODES)
def test_members_equal_separate_runs(mode, model, batches, sweep_steps):
    keys = [loop.run_keys(s) for s in SEEDS]
    states = sweep.init_sweep(jnp.stack([k[0] for k in keys]), model, SHAPE, LATENT)
    step_keys = jnp.stack([k[1] for k in keys])
    hp = langevin.stack_hparams(STEP_SIZES, DECAYS)
    step_fn = sweep_steps[mode]
    sweep_metrics = []
    for step, x in enumerate(batches):  # step 0 from the prior, then encoder warm starts
        rng = jax.vmap(jax.random.fold_in, in_axes=(0, None))(step_keys, step)
        states, metrics = step_fn(states, jnp.asarray(x), rng, hp)
        sweep_metrics.append(jax.device_get(metrics))
    for k, (seed, s, d) in enumerate(zip(SEEDS, STEP_SIZES, DECAYS)):
        state, metrics = separate_run(CONFIG, model, seed, s, d, batches)
        # lax.map runs the single-run computation itself; vmap batches the matmuls
        # (another summation order), and the chain amplifies the rounding a little.
        rtol, atol = (1e-4, 1e-5) if mode == "vmap" else (1e-6, 1e-7)
        assert_close(sweep.member(states, k).params, state.params, rtol, atol)
        assert_close(sweep.member(states, k).opt_state, state.opt_state, 10 * rtol, 10 * atol)
        for ms, m in zip(sweep_metrics, metrics):
            assert_close({n: v[k] for n, v in ms.items()}, m, 10 * rtol, 10 * atol)
    # The members really differ (different seeds and settings).
    assert not np.allclose(states.params["decoder"]["Dense_0"]["kernel"][0],
                           states.params["decoder"]["Dense_0"]["kernel"][1])


@pytest.mark.parametrize("mode", sweep.SWEEP_MODES)
def test_shapes_and_no_retrace_across_hparams(mode, model, batches, sweep_steps):
    K = 3
    states = sweep.init_sweep(jax.random.split(jax.random.key(0), K), model, SHAPE, LATENT)
    single = jax.eval_shape(lambda: create_train_state(jax.random.key(0), model, SHAPE, LATENT))
    chex.assert_trees_all_equal_shapes(sweep.member(states, 0), single)
    jax.tree.map(lambda a, b: chex.assert_shape(a, (K, *b.shape)), states, single)

    step_fn = sweep_steps[mode]  # assert_max_traces(n=1): new hparams values must not retrace
    keys = jax.random.split(jax.random.key(1), K)
    x = jnp.asarray(batches[0])
    for step_sizes, decays in [((0.01, 0.1, 0.5), (0.0, 0.25, 0.99)), ((1e-4, 2.0, 0.3), (0.5, 0.9, 0.0))]:
        new_states, metrics = step_fn(states, x, keys, langevin.stack_hparams(step_sizes, decays))
        for v in metrics.values():
            chex.assert_shape(v, (K,))
            chex.assert_type(v, jnp.float32)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_states, states)


def test_run_sweep_matches_train_loop_and_writes_results(model, sweep_steps, tmp_path, monkeypatch):
    # The preconditioned group (K = 3) runs this module's step of the default mode:
    # traced once for all tests here and every step of the sweep (assert_max_traces).
    real = sweep.jit_sweep_step
    chex.clear_trace_counter()  # run_sweep's inputs are placed on the device mesh: one more trace, then none
    monkeypatch.setattr(sweep, "jit_sweep_step", lambda config, model_, precondition, mode, **kw: (
        sweep_steps[mode] if (config, model_, precondition) == (CONFIG, model, True)
        else real(config, model_, precondition, mode, **kw)))
    train_images, test_images = uint8_images(12, key=5), uint8_images(7, key=6)  # 4 batches per epoch
    step_sizes = [0.01, 0.03, 0.1]
    summary = sweep.run_sweep(CONFIG, step_sizes, ["off", 0.25], str(tmp_path), model=model,
                              train_images=train_images, test_images=test_images, metric="log_p_end")
    members = summary["members"]
    assert [(m["decay"], m["step_size"], m["precondition"]) for m in members] == [  # decay-major
        *[("off", s, False) for s in step_sizes], *[(0.25, s, True) for s in step_sizes]]
    # train.py's batch order (seed, epoch) across an epoch boundary: 5 steps = 4 + 1.
    batches = [x for epoch in range(2) for x in pipeline.batches(train_images, BATCH, CONFIG.seed, epoch)][:5]
    for m in members:
        state, metrics = separate_run(CONFIG, model, CONFIG.seed, m["step_size"],
                                      0.0 if m["decay"] == "off" else m["decay"], batches, m["precondition"])
        assert_close({n: m[n] for n in ("elbo", "log_p_end", "log_p_chain", "forward_kl")},
                     {n: float(metrics[-1][n]) for n in ("elbo", "log_p_end", "log_p_chain", "forward_kl")},
                     1e-3, 1e-4)
        assert m["diverged_at_step"] is None and np.isfinite(m["test_elbo_nats"])
    assert summary["steps"] == 5 and summary["metric"] == "log_p_end"
    best = max(members, key=lambda m: m["log_p_end"])
    assert summary["best_member"] == best["member"]
    for name in ("sweep_results.json", "sweep_results.md", "sweep_log_p_end.png", "sweep_metrics.jsonl"):
        assert os.path.getsize(tmp_path / name) > 0
    assert json.loads((tmp_path / "sweep_results.json").read_text())["members"] == members
    md = (tmp_path / "sweep_results.md").read_text()
    assert md.count("\n| ") == 2 + len(members)  # header, separator, one row per member
    rows = [json.loads(line) for line in (tmp_path / "sweep_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] * 6 + [4] * 6 + [5] * 6


def test_diverged_member_is_reported_and_others_go_on(model, tmp_path):
    # Same program as the "off" group above (cached by jit_sweep_step): no new compile.
    images = uint8_images(12, key=5)
    summary = sweep.run_sweep(CONFIG, [0.01, 0.03, 1e30], ["off"], str(tmp_path), model=model,
                              train_images=images, test_images=images[:3])
    ok, bad = summary["members"][:2], summary["members"][2]
    assert bad["diverged_at_step"] == 1 and bad["elbo"] is None and bad["test_elbo_nats"] is None
    assert all(m["diverged_at_step"] is None and np.isfinite(m["elbo"]) for m in ok)
    assert summary["best_member"] in (0, 1) and summary["steps"] == 5
    assert "| 2 | 1e+30 | off | 0 | — |" in (tmp_path / "sweep_results.md").read_text()


RESUME_GRID = ([0.01, 0.03, 1e30], ["off"])  # the program of the test above: no new compile


@pytest.fixture(scope="module")
def straight_sweep(model, tmp_path_factory):
    """An uninterrupted 5-step sweep whose third member diverges at step 1."""
    workdir = tmp_path_factory.mktemp("straight_sweep")
    images = uint8_images(12, key=5)
    summary, params = sweep.run_sweep(CONFIG, *RESUME_GRID, str(workdir), model=model, train_images=images,
                                      test_images=images[:3], return_params=True)
    return workdir, summary, params


def _sweep_rows(workdir):
    rows = [json.loads(line) for line in (workdir / "sweep_metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("examples_per_s", "wall_s")} for r in rows]


@pytest.mark.parametrize("where", ["on_log", "during_step"])
def test_sweep_resumes_bitwise_after_an_interrupt(model, straight_sweep, tmp_path, monkeypatch, where):
    want_dir, want, want_params = straight_sweep
    images = uint8_images(12, key=5)
    run = functools.partial(sweep.run_sweep, CONFIG, *RESUME_GRID, str(tmp_path), model=model,
                            train_images=images, test_images=images[:3], return_params=True)

    def on_log(step, rows):
        if step == 4:  # a log step (log_every=2) that is no checkpoint step (checkpoint_every=500)
            raise KeyboardInterrupt

    fetch, calls = loop.fetch, []

    def interrupted(tree):  # Ctrl-C while the host fetches step 4's check (steps 1, 2, 3, 4 fetched)
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return fetch(tree)

    if where == "during_step":
        monkeypatch.setattr(loop, "fetch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(on_log=on_log if where == "on_log" else None)
    monkeypatch.setattr(loop, "fetch", fetch)
    with checkpoints.Checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.latest_step() == 4  # saved on the way out
    assert not (tmp_path / "sweep_results.json").exists()

    got, params = run()
    chex.assert_trees_all_equal(params, want_params)  # bitwise, the diverged member included
    assert got["members"] == want["members"] and got["steps"] == 5
    assert got["members"][2]["diverged_at_step"] == 1  # remembered across the restart
    rows, want_rows = _sweep_rows(tmp_path), _sweep_rows(want_dir)
    if where == "during_step":  # step 4 finished but was never logged; it is not redone
        want_rows = [r for r in want_rows if r["step"] != 4]
    assert rows == want_rows  # every logged step once, same values

    again, params = run()  # nothing left to train: the results come from the checkpoint
    chex.assert_trees_all_equal(params, want_params)
    assert again["members"] == want["members"]


def test_sweep_refuses_to_resume_another_grid(model, straight_sweep, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(straight_sweep[0], workdir)
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    images = uint8_images(12, key=5)
    with pytest.raises(ValueError, match="sweep_config.json holds a sweep over other members"):
        sweep.run_sweep(CONFIG, [0.01, 0.03], ["off"], str(workdir), model=model, train_images=images,
                        test_images=images[:3])
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("step_sizes,decays,match", [
    ([], [0.5], "step_sizes is empty"),
    ([0.1, 0.1], [0.5], "step_sizes=.*duplicate"),
    ([0.0], [0.5], "step_size=0.0 is invalid"),  # Config.validate on the member
    ([float("nan")], [0.5], "step_size=nan is invalid"),
    ([0.1], [1.0], "decay=1.0 is invalid"),
    ([0.1], [-0.1], "decay=-0.1 is invalid"),
    ([0.1], ["sometimes"], "decays: 'sometimes' is invalid"),
    (["0.1"], [0.5], "step_sizes: '0.1' is invalid"),
])
def test_resolve_members_names_the_flag(step_sizes, decays, match):
    with pytest.raises(ValueError, match=match):
        sweep.resolve_members(CONFIG, step_sizes, decays)


def test_decays_need_the_preconditioner():
    off = dataclasses.replace(CONFIG, preconditioner=False)
    with pytest.raises(ValueError, match="decays: 0.5 needs the preconditioner"):
        sweep.resolve_members(off, [0.1], [0.5])
    assert [m["decay"] for m in sweep.resolve_members(off, [0.1, 0.2], None)] == ["off", "off"]
    assert [m["decay"] for m in sweep.resolve_members(CONFIG, [0.1], None)] == [CONFIG.decay]


def test_sweep_step_revalidates_its_preconditioner_override(model):
    # An explicit Adam-style metric with precondition=False contradicts itself, as in Config.
    adam = dataclasses.replace(CONFIG, chain_metric="adam")
    with pytest.raises(ValueError, match="chain_metric='adam' is invalid: an Adam-style metric contradicts"):
        sweep.make_sweep_step(adam, model, precondition=False)
    assert callable(sweep.make_sweep_step(adam, model, precondition=True))


CLI_CASES = [
    (["--step_sizes=0.1,abc"], "--step_sizes='0.1,abc': 'abc' is not a number"),
    (["--step_sizes=0.1,-1"], "step_size=-1.0 is invalid"),
    (["--step_sizes="], "step_sizes is empty"),
    (["--decays=0.5,1.5"], "decay=1.5 is invalid"),
    (["--decays=off,x"], "--decays='off,x': 'x' is not a number or 'off'"),
    (["--decays=0.5", "--nopreconditioner"], "decays: 0.5 needs the preconditioner"),
    (["--metric=bogus"], "--metric='bogus' is invalid"),
    (["--algorithm=vae"], "--algorithm='vae'"),
    (["--num_steps=0"], "num_steps=0"),
    (["--decays=off,0.25,0.99", "--step_sizes=0.001,0.5"], "OK 6"),
]

_CLI_SCRIPT = """
import json, sys
from absl import app, flags
from experiments import sweep as cli
for args in json.loads(sys.argv[1]):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["sweep", *args])
    try:
        config, step_sizes, decays, metric = cli.parse_sweep_flags()
        print("OK", len(step_sizes) * len(decays))
    except app.UsageError as e:
        print(e)
"""


def test_cli_validates_up_front():
    # One interpreter for every case (absl flags are process-global).
    proc = subprocess.run([sys.executable, "-c", _CLI_SCRIPT, json.dumps([a for a, _ in CLI_CASES])],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(CLI_CASES), proc.stdout
    for (args, match), line in zip(CLI_CASES, lines):
        assert match in line, (args, line)


@pytest.mark.slow
def test_member_equals_train_and_evaluate(tmp_path):
    """Real 28x28 networks and Fashion-MNIST: member k == train_and_evaluate(step_size_k, decay_k)."""
    from lpc_jax.training import train

    config = Config(dataset="fashion_mnist", max_train_examples=256, batch_size=16, num_steps=3,
                    num_train_steps=3, prior_init_batches=1, eval_examples=64, log_every=1, checkpoint_every=3)
    try:
        summary, params = sweep.run_sweep(config, [0.05, 0.2], [0.5], str(tmp_path / "sweep"),
                                          return_params=True)
    except sources.DatasetNotFoundError:
        pytest.skip("Fashion-MNIST IDX files not installed")
    k = 1
    single = dataclasses.replace(config, step_size=0.2, decay=0.5)
    result = train.train_and_evaluate(single, str(tmp_path / "single"))
    row = json.loads((tmp_path / "single" / "metrics.jsonl").read_text().splitlines()[-1])
    m = summary["members"][k]
    for name in ("elbo", "log_p_end", "log_p_chain"):
        np.testing.assert_allclose(m[name], row[name], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(m["test_elbo_nats"], result["test_elbo_nats"], rtol=1e-5, atol=1e-3)
    model = build.build_model(single)
    with checkpoints.Checkpointer(str(tmp_path / "single")) as ckpt:
        state = ckpt.restore(create_train_state(jax.random.key(0), model, (28, 28, 1), 40))
    assert m["step_size"] == 0.2 and m["decay"] == 0.5
    chex.assert_trees_all_close(params[k], state.params, atol=1e-5, rtol=1e-5)
