"""Shared fixtures: one ``xp`` per installed backend, jit applied automatically.

- ``xp`` runs a test on numpy, jax (eager), jax-jit, array_api_strict, and on
  torch and dask when they are installed. Choose a subset with
  ``ARRAYQUANT_BACKENDS=numpy,jax`` (unknown or missing backends are skipped,
  never silently passed).
- ``call`` wraps a public function so that under ``jax-jit`` it runs inside
  ``jax.jit``: array (and QArray) arguments are traced, everything else is
  static configuration, as a user would write it.
- Hypothesis: a quick default profile and a thorough ``ci`` profile, chosen by
  ``HYPOTHESIS_PROFILE`` (CI sets ``ci``).
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import arrayquant as aq

settings.register_profile(
    "default",
    max_examples=20,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.differing_executors,
        HealthCheck.function_scoped_fixture,  # backend fixtures hold no state
    ],
)
settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.differing_executors,
        HealthCheck.function_scoped_fixture,  # backend fixtures hold no state
    ],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

ALL_BACKENDS = ("numpy", "jax", "jax-jit", "array_api_strict", "torch", "dask")


def _selected() -> tuple[str, ...]:
    env = os.environ.get("ARRAYQUANT_BACKENDS")
    return tuple(b.strip() for b in env.split(",")) if env else ALL_BACKENDS


class Backend:
    """A backend under test: its namespace, a converter and static facts."""

    def __init__(self, name: str):
        self.name = name
        self.jit = name == "jax-jit"
        if name in ("jax", "jax-jit"):
            import jax

            jax.config.update("jax_enable_x64", False)
            import jax.numpy as jnp

            self.xp = jnp
        elif name == "numpy":
            import array_api_compat.numpy as xp

            self.xp = xp
        elif name == "torch":
            import array_api_compat.torch as xp

            self.xp = xp
        elif name == "dask":
            import array_api_compat.dask.array as xp

            self.xp = xp
        else:
            self.xp = importlib.import_module(name)

    @property
    def is_jax(self) -> bool:
        return self.name in ("jax", "jax-jit")

    def float_dtypes(self) -> tuple[str, ...]:
        if self.name == "array_api_strict":
            return ("float32", "float64")
        if self.is_jax:
            return ("float16", "bfloat16", "float32")
        if self.name == "numpy":
            return ("float16", "bfloat16", "float32", "float64")
        return ("float16", "float32", "float64")

    def asarray(self, a, dtype: str | None = None):
        """Convert a NumPy array (float64 or any) to this backend, in ``dtype``."""
        a = np.asarray(a)
        if dtype is not None:
            if dtype not in self.float_dtypes() and dtype.startswith(("float", "bfloat")):
                pytest.skip(f"{self.name} has no {dtype}")
            a = a.astype(_np_dtype(dtype))
        if self.name == "array_api_strict":
            return self.xp.asarray(a)
        if self.is_jax:
            return self.xp.asarray(a)
        if self.name == "numpy":
            return a
        return self.xp.asarray(a)

    def to_numpy(self, a):
        if a is None:
            return None
        if self.name == "array_api_strict":
            return np.asarray(a._array)
        if self.name == "torch":
            return a.numpy()
        return np.asarray(a)

    def __repr__(self) -> str:
        return self.name


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _available(name: str) -> bool:
    module = {"jax-jit": "jax", "dask": "dask.array"}.get(name, name)
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


@pytest.fixture(params=ALL_BACKENDS)
def backend(request) -> Backend:
    name = request.param
    if name not in _selected():
        pytest.skip(f"backend {name} not selected by ARRAYQUANT_BACKENDS")
    if not _available(name):
        pytest.skip(f"backend {name} is not installed")
    return Backend(name)


@pytest.fixture
def xp(backend):
    return backend.xp


def _is_dynamic(a) -> bool:
    import jax

    return isinstance(a, (jax.Array, aq.QArray, aq.LinearWeight, aq.LayerStats))


def jit_call(f):
    """Call ``f`` inside ``jax.jit``: arrays and QArrays traced, the rest static."""
    import jax

    def call(*args, **kwargs):
        dyn_pos = [i for i, a in enumerate(args) if _is_dynamic(a)]
        dyn_kw = [k for k, v in kwargs.items() if _is_dynamic(v)]

        def inner(pos, kw):
            full = list(args)
            for i, v in zip(dyn_pos, pos):
                full[i] = v
            return f(*full, **{**kwargs, **kw})

        return jax.jit(inner)([args[i] for i in dyn_pos], {k: kwargs[k] for k in dyn_kw})

    return call


@pytest.fixture
def call(backend):
    """``call(f)(*args, **kwargs)``: runs ``f`` directly, or under jax.jit for jax-jit."""
    if backend.jit:
        return jit_call
    return lambda f: f


def run_on_host_devices(script: str, devices: int = 8) -> str:
    """Run ``script`` in a fresh Python with ``devices`` host (CPU) JAX devices; return
    the last line it printed. The device count must be set before JAX starts."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def skip_eager_jax(backend, covered_by: str = "jax-jit runs the same code") -> None:
    """Skip a property test's eager-JAX run: eager JAX compiles every operation for every
    new shape, so a hypothesis test there costs minutes of CI for code that jax-jit (and
    the eager tests named in ``covered_by``) already run."""
    if backend.name == "jax":
        pytest.skip(f"eager JAX compiles each operation per shape; {covered_by}")
