"""Sharded QArrays on 8 host devices: sharding_like, device_put, shard_map, load(shardings=).

Each test runs a script in a subprocess: the device count must be set before JAX starts.
"""

from __future__ import annotations

import json

import pytest
from conftest import run_on_host_devices

pytest.importorskip("jax")

_SCRIPT = r"""
import json, os, tempfile
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import arrayquant as aq

shard_map = getattr(jax, "shard_map", None)
if shard_map is None:
    from jax.experimental.shard_map import shard_map
mesh = Mesh(np.array(jax.devices()).reshape(8), ("x",))
rng = np.random.default_rng(0)
w = rng.standard_normal((16, 256)).astype(np.float32)
ws = rng.standard_normal((8, 16, 256)).astype(np.float32)
out = {"devices": jax.device_count(), "cases": {}}
cases = [
    ("int8 per channel, in sharded", w, dict(dtype="int8", symmetric=True, axis=0), P(None, "x")),
    ("int4 g32, in sharded", w, dict(dtype="int4", symmetric=True, group_size=32), P(None, "x")),
    ("uint4 g32 asym, out sharded", w, dict(dtype="uint4", group_size=32), P("x", None)),
    ("uint4 per tensor, in sharded", w, dict(dtype="uint4"), P(None, "x")),
    ("stacked uint4 g32, layers sharded", ws, dict(dtype="uint4", group_size=32, batch_axes=1),
     P("x")),
]
for name, a, kw, spec in cases:
    qa = aq.quantize(a, **kw)
    s = NamedSharding(mesh, spec)
    tree = aq.sharding_like(qa, s)
    qs = jax.device_put(jax.tree.map(jnp.asarray, qa), tree)
    full = np.asarray(aq.dequantize(qa))
    got = np.asarray(jax.jit(aq.dequantize)(qs))
    specs = aq.sharding_like(qa, s)
    in_specs = jax.tree.map(lambda t: t.spec, specs)
    local = shard_map(aq.dequantize, mesh=mesh, in_specs=(in_specs,), out_specs=spec)(qs)
    out["cases"][name] = {
        "data": list(qs.data.sharding.spec), "scale": list(qs.scale.sharding.spec),
        "equal": bool(np.array_equal(got, full)),
        "shard_map_equal": bool(np.array_equal(np.asarray(local), full)),
        "local_shape": [int(n) for n in qs.data.addressable_shards[0].data.shape],
    }
# load(shardings=): leaves go straight to their devices.
d = tempfile.mkdtemp()
path = os.path.join(d, "m.safetensors")
tree = {"w": aq.quantize(w, "int4", True, group_size=32), "b": np.arange(256, dtype=np.float32),
        "n": aq.quantize(w, "int8", True, axis=0)}
aq.save(path, tree)
loaded = aq.load(path, shardings={"w": NamedSharding(mesh, P(None, "x")),
                                  "b": NamedSharding(mesh, P("x"))})
out["load"] = {
    "w_data": list(loaded["w"].data.sharding.spec),
    "w_scale": list(loaded["w"].scale.sharding.spec),
    "b": list(loaded["b"].sharding.spec), "n_is_numpy": isinstance(loaded["n"].data, np.ndarray),
    "w_equal": bool(np.array_equal(np.asarray(aq.dequantize(loaded["w"])),
                                   aq.dequantize(tree["w"]))),
}
f = aq.load(path, shardings=lambda p, leaf: NamedSharding(mesh, P()) if p == "n" else None)
out["load"]["fn"] = list(f["n"].data.sharding.spec)
try:
    aq.load(path, shardings={"missing": NamedSharding(mesh, P())})
except ValueError as e:
    out["load"]["unknown"] = str(e)
try:
    aq.sharding_like(aq.quantize(w[:, :20], "uint4"), NamedSharding(mesh, P(None, "x")))
except ValueError as e:
    out["bad_packed"] = str(e)
# Groups of 4 split over 8 devices along 24 columns (3 per device): under jit the values are
# right (scales replicated); inside shard_map a shard holds no whole group: a clear error.
qm = aq.quantize(np.ones((8, 24), np.float32), "int8", True, group_size=4)
sm = aq.sharding_like(qm, NamedSharding(mesh, P(None, "x")))
qms = jax.device_put(jax.tree.map(jnp.asarray, qm), sm)
out["misaligned_jit_equal"] = bool(np.array_equal(np.asarray(jax.jit(aq.dequantize)(qms)),
                                                  aq.dequantize(qm)))
try:
    shard_map(aq.dequantize, mesh=mesh, in_specs=(jax.tree.map(lambda t: t.spec, sm),),
              out_specs=P(None, "x"))(qms)
except ValueError as e:
    out["misaligned_shard_map"] = str(e)
# Fake quantization (QAT) of a weight split along in: values and STE gradient as unsharded.
ws_ = jax.device_put(jnp.asarray(w), NamedSharding(mesh, P(None, "x")))
fq = jax.jit(jax.value_and_grad(
    lambda v: jnp.sum(aq.fake_quantize(v, "int4", group_size=32) ** 2)))
val, grad = fq(ws_)
ref = aq.dequantize(aq.quantize(w, "int4", group_size=32))
out["fake"] = {"value": bool(np.isclose(float(val), float(np.sum(ref.astype(np.float64) ** 2)),
                                        rtol=1e-5)),
               "grad_equal": bool(np.array_equal(np.asarray(grad), 2 * ref)),
               "grad_spec": list(grad.sharding.spec)}
print(json.dumps(out))
"""


def test_sharded_qarrays_on_eight_devices():
    out = json.loads(run_on_host_devices(_SCRIPT))
    assert out["devices"] == 8
    c = out["cases"]
    for name, r in c.items():
        assert r["equal"] and r["shard_map_equal"], (name, r)
    # Per channel: codes split along in, the one scale per row replicated along in.
    assert c["int8 per channel, in sharded"]["data"] == [None, "x"]
    assert c["int8 per channel, in sharded"]["scale"] == [None, None]
    assert c["int8 per channel, in sharded"]["local_shape"] == [16, 32]
    # Groups of 32 along in, 32 columns per device: scales split with the codes; packed
    # codes hold 16 bytes per device.
    assert c["int4 g32, in sharded"]["scale"] == [None, "x"]
    assert c["int4 g32, in sharded"]["local_shape"] == [16, 16]
    assert c["uint4 g32 asym, out sharded"]["scale"] == ["x", None]
    assert c["uint4 per tensor, in sharded"]["scale"] == [None, None]
    assert c["stacked uint4 g32, layers sharded"]["data"] == ["x", None, None]
    assert c["stacked uint4 g32, layers sharded"]["local_shape"] == [1, 16, 128]
    load = out["load"]
    assert load["w_data"] == [None, "x"]
    assert load["w_scale"] == [None, "x"]
    assert load["b"] == ["x"] and load["n_is_numpy"] and load["w_equal"]
    assert load["fn"] == [None, None]
    assert "shardings name paths that the checkpoint does not hold: 'missing'" in load["unknown"]
    assert "would cut bytes of 2 codes" in out["bad_packed"]
    assert out["misaligned_jit_equal"]
    assert "Inside shard_map each shard must hold whole blocks" in out["misaligned_shard_map"]
    assert out["fake"]["value"] and out["fake"]["grad_equal"], out["fake"]
    assert out["fake"]["grad_spec"] == [None, "x"]
