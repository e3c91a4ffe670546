"""Quantizing a float checkpoint file tensor by tensor (:func:`quantize_checkpoint`)."""

from __future__ import annotations

import math
import pathlib
from collections.abc import Iterable

import numpy as np

from arrayquant._backend import is_float_dtype
from arrayquant._io import check_input_file
from arrayquant.affine.methods import is_data_aware
from arrayquant.blocking import plan
from arrayquant.checkpoint.document import is_arrayquant
from arrayquant.checkpoint.loading import npz_headers, open_safetensors, read_header, read_tensor
from arrayquant.checkpoint.saving import build_metadata, write_atomic
from arrayquant.checkpoint.schema import fail, plain_leaves, role_names
from arrayquant.checkpoint.stfile import np_dtype
from arrayquant.packing import packed_length
from arrayquant.qtypes import as_qtype
from arrayquant.trees import (
    LeafReport,
    Rule,
    TreeReport,
    as_rules,
    leaf_report,
    quantize_leaf,
    select_rule,
)

__all__ = ["quantize_checkpoint"]


class _Source:
    """Tensors of an input checkpoint: names, dtypes and shapes up front, data one by one."""

    def __init__(self, file: pathlib.Path):
        self.file = file
        if file.suffix == ".npz":
            self.kind = "npz"
            self.specs = npz_headers(file)
        else:
            self.kind = "safetensors"
            tensors, meta = read_header(file)
            if is_arrayquant(meta):
                fail(file, "is already an arrayquant checkpoint; quantize the float original")
            for leaf in plain_leaves(file, tensors):
                tensors[leaf.path] = (leaf.dtype, leaf.shape)
            self.specs = tensors
        self._handle = None

    def __enter__(self):
        if self.kind == "npz":
            self._handle = np.load(self.file, allow_pickle=False)
        else:
            self._ctx = open_safetensors(self.file)
            self._handle = self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.kind == "npz":
            self._handle.close()
        else:
            self._ctx.__exit__(*exc)

    def get(self, name: str) -> np.ndarray:
        if self.kind == "npz":
            try:
                return self._handle[name]
            except Exception as e:  # noqa: BLE001  (as in npz_headers)
                fail(self.file, f"cannot read array {name!r} ({type(e).__name__}: {e})")
        return read_tensor(self.file, self._handle, name)


def _plan_leaf(name: str, dtype: str, shape, rules) -> tuple[Rule | None, list, dict]:
    """The rule for a tensor, its output tensors [(name, dtype, shape)] and its leaf entry."""
    rule = select_rule(rules, name, shape, dtype)
    if rule is None or rule.dtype is None or not is_float_dtype(dtype):
        return None, [(name, dtype, shape)], {"path": name, "kind": "array", "tensor": name}
    if is_data_aware(rule.method):
        raise ValueError(
            f"cannot quantize {name!r} with {rule!r}: quantize_checkpoint reads no calibration "
            "data, and a data-aware method needs the layer's activation statistics; use "
            "save(path, quantize_tree(load(in_path), rules, stats=...)) instead")
    qt = as_qtype(rule.dtype)
    try:
        b = plan(tuple(shape), rule.axis, rule.group_size, rule.group_axis)
    except (ValueError, TypeError) as e:
        raise type(e)(f"cannot quantize {name!r} of shape {tuple(shape)} with {rule!r}: {e}") \
            from e
    packed_axis = len(shape) - 1 if qt.bits < 8 and len(shape) > 0 else None
    if packed_axis is None:
        data_shape, data_dtype = tuple(shape), qt.storage
    else:
        data_shape = (*shape[:-1], packed_length(shape[-1], qt.bits))
        data_dtype = "uint8"
    scale_dtype = rule.scale_dtype if isinstance(rule.scale_dtype, str) \
        else np.dtype(rule.scale_dtype).name
    names = role_names(name, rule.symmetric)
    outs = [(names["data"], data_dtype, data_shape), (names["scale"], scale_dtype, b.scale_shape)]
    if not rule.symmetric:
        outs.append((names["zero_point"], qt.storage, b.scale_shape))
    entry = {"path": name, "kind": "qarray", "qtype": qt.name, "dtype": dtype,
             "shape": list(shape), "block_shape": list(b.block), "packed_axis": packed_axis,
             **names}
    return rule, outs, entry


def quantize_checkpoint(in_path, out_path, rules: Rule | Iterable[Rule], *,
                        progress: bool = False) -> TreeReport:
    """Quantize a float checkpoint file into an arrayquant checkpoint, one tensor at a time.

    ``in_path`` is a safetensors file or an ``.npz`` file (read without pickle);
    its tensors are the leaves of a flat dict, their names the paths that
    ``rules`` match (see :class:`Rule`; the first matching rule decides, others
    are copied unchanged). The output is what ``save(out_path,
    quantize_tree(load(in_path), rules))`` would hold, but it is written as it
    goes: the header is computed from the shapes first, then each tensor is read,
    quantized, appended and dropped. Peak memory is a small multiple of the
    largest tensor (see ``docs/benchmarks.md``). The write is atomic.

    Args:
        progress: show a tqdm progress bar (bytes read) on stderr.

    Returns:
        the :class:`TreeReport` (per tensor: bytes before and after, SQNR).

    Raises:
        FileNotFoundError: no input file.
        CheckpointError: a malformed input, or an input that is already quantized.
        ValueError, TypeError: a rule that does not fit a tensor (named), NaN or inf
            in a selected tensor, ``out_path`` equal to ``in_path``.
    """
    rules = as_rules(rules)
    src_file, out_file = check_input_file(in_path), pathlib.Path(out_path)
    if out_file.exists() and out_file.resolve() == src_file.resolve():
        raise ValueError(f"the output {out_file} is the input; choose another output path")
    source = _Source(src_file)
    plans = [(name, *_plan_leaf(name, dtype, shape, rules))
             for name, (dtype, shape) in source.specs.items()]
    specs = [spec for _, _, outs, _ in plans for spec in outs]
    seen: set[str] = set()
    for name, _, _ in specs:
        if name in seen:
            raise ValueError(f"tensor name {name!r} would be written twice; rename the input "
                             "tensor that clashes with it")
        seen.add(name)
    metadata = build_metadata([entry for *_, entry in plans], None, specs)
    total = sum(math.prod(s) * np_dtype(d).itemsize for d, s in source.specs.values())
    rows: list[LeafReport] = []
    from tqdm import tqdm

    def parts(bar):
        """Read, quantize and yield one tensor at a time, then drop it."""
        for name, rule, outs, entry in plans:
            x = source.get(name)
            if rule is None:
                yield name, x
                rows.append(leaf_report(name, x, x))
            else:
                qa = quantize_leaf(rule, name, x)
                if (qa.block_shape, qa.packed_axis) != (tuple(entry["block_shape"]),
                                                        entry["packed_axis"]):
                    raise RuntimeError(f"internal error: {name!r} was quantized as {qa!r}, not "
                                       "as planned")
                for (tname, _, _), part in zip(outs, (qa.data, qa.scale, qa.zero_point)):
                    yield tname, part
                rows.append(leaf_report(name, x, qa))
                del qa
            bar.update(x.nbytes)
            del x

    with source, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      disable=not progress, desc=src_file.name, leave=False) as bar:
        write_atomic(out_path, specs, metadata, parts(bar))
    return TreeReport(tuple(rows))
