import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
# The suite compares with exact and float64 references at float32 tolerances (1e-5 to
# 2e-4): run every matmul and convolution at full float32, as on the CPU, also where the
# default is TF32 (NVIDIA GPUs) or bf16 passes (TPUs). A test of the default precision
# sets its own (``with jax.default_matmul_precision("default")``).
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def rng_key():
    return jax.random.key(0)


_CACHE_ENV = "LPC_JAX_TEST_XLA_CACHE"


def pytest_configure(config):
    # One on-disk compilation cache for the session: the train-loop tests compile the
    # same step several times (fresh runs, resumed runs, subprocesses).
    # Under pytest-xdist the controller makes the directory before it starts the
    # workers, which inherit it through the environment and share it.
    import atexit
    import os
    import shutil
    import tempfile

    cache_dir = os.environ.get(_CACHE_ENV)
    if cache_dir is None or not hasattr(config, "workerinput"):
        cache_dir = tempfile.mkdtemp(prefix="lpc_jax_xla_cache_")
        os.environ[_CACHE_ENV] = cache_dir
        atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
