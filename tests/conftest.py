import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng_key():
    return jax.random.key(0)


def pytest_configure(config):
    # One on-disk compilation cache for the session: the train-loop tests compile the
    # same step several times (fresh runs, resumed runs, subprocesses).
    import atexit
    import shutil
    import tempfile

    cache_dir = tempfile.mkdtemp(prefix="lpc_jax_xla_cache_")
    atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
