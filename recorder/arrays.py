"""Arrow arrays from Python values, built through their buffers instead of ``pa.array``.

``pa.array`` asks pyarrow's pandas shim whether its input is a pandas object, and the
first time anything asks, pyarrow imports pandas where it is installed: 0.25-0.3 s on
the development host, as long as the whole rest of a short recording's start-up. The
recorder only ever converts lists of integers, booleans, bytes, strings and lists of
integers (``None`` for null), which are a few lines each as buffers, so no recording
imports pandas (docs/benchmarks.md, issue 18).

The conversions are stricter than ``pa.array``: a float is never truncated into an
integer column, a ``str`` is not accepted as bytes, nor ``bytes`` as a string. Every
rejected value raises ``TypeError``, ``ValueError`` or ``OverflowError``, which the
writer turns into a recorded value error for that cell.
"""

from __future__ import annotations

import array
import itertools
import operator
from collections.abc import Sequence, Sized
from typing import Any

import pyarrow as pa
from vsmtrace.recorder import compute

#: ``array`` type codes of the integer types the schema uses (sizes checked at import).
_INT_CODES: dict[pa.DataType, str] = {
    pa.int8(): "b",
    pa.uint8(): "B",
    pa.int16(): "h",
    pa.uint16(): "H",
    pa.int32(): "i",
    pa.uint32(): "I",
    pa.int64(): "q",
    pa.uint64(): "Q",
}
for _typ, _code in _INT_CODES.items():
    assert array.array(_code).itemsize * 8 == _typ.bit_width, (_typ, _code)


def column(values: Sequence[Any], typ: pa.DataType) -> pa.Array:
    """``values`` (``None`` = null) as an Arrow array of ``typ``."""
    validity, nulls = _validity(values)
    if nulls:
        fill = _fill(typ)
        values = [fill if v is None else v for v in values]
    n = len(values)
    if typ in _INT_CODES:
        return pa.Array.from_buffers(typ, n, [validity, _int_buffer(values, _INT_CODES[typ])], null_count=nulls)
    if pa.types.is_boolean(typ):
        if not all(type(v) is bool for v in values):
            raise TypeError(f"expected bool in {typ} column")
        return pa.Array.from_buffers(typ, n, [validity, _bitmap(bytes(values))], null_count=nulls)
    if pa.types.is_string(typ) or pa.types.is_binary(typ):
        if pa.types.is_string(typ):
            parts = [str.encode(v) for v in values]
        else:
            parts = [v if type(v) is bytes else bytes(memoryview(v)) for v in values]
        return pa.Array.from_buffers(typ, n, [validity, _offsets(parts), pa.py_buffer(b"".join(parts))], null_count=nulls)
    if pa.types.is_list(typ):
        child = column(list(itertools.chain.from_iterable(values)), typ.value_type)
        return pa.Array.from_buffers(typ, n, [validity, _offsets(values)], null_count=nulls, children=[child])
    raise TypeError(f"no conversion to {typ}")


def scalar(value: Any, typ: pa.DataType) -> pa.Scalar:
    """``value`` as an Arrow scalar of ``typ`` for compute calls: ``pa.scalar``, like ``pa.array``, asks
    pandas (and a Python value passed to a compute function goes through ``pa.scalar``)."""
    return column([value], typ)[0]


def _fill(typ: pa.DataType) -> Any:
    """What a null cell holds in the value buffer (variable-width types: nothing)."""
    if pa.types.is_boolean(typ):
        return False
    if pa.types.is_string(typ):
        return ""
    if pa.types.is_binary(typ):
        return b""
    if pa.types.is_list(typ):
        return ()
    return 0


def _validity(values: Sequence[Any]) -> tuple[pa.Buffer | None, int]:
    """The validity bitmap of ``values`` (None when nothing is null) and the null count."""
    nulls = values.count(None) if isinstance(values, list) else sum(v is None for v in values)
    if not nulls:
        return None, 0
    return _bitmap(bytes(map(operator.is_not, values, itertools.repeat(None)))), nulls


def _bitmap(flags: bytes) -> pa.Buffer:
    """One bit per byte of ``flags`` (0 or 1), least significant bit first, as Arrow bitmaps are."""
    as_bytes = pa.Array.from_buffers(pa.uint8(), len(flags), [None, pa.py_buffer(flags)])
    return compute.cast(as_bytes, pa.bool_()).buffers()[1]


def _int_buffer(values: Sequence[Any], code: str) -> pa.Buffer:
    if bool in map(type, values):  # array() takes bools as ints; a bool here is a caller's mistake
        raise TypeError(f"expected int, got bool ({code!r} column)")
    return pa.py_buffer(array.array(code, values))


def _offsets(parts: Sequence[Sized]) -> pa.Buffer:
    """int32 offsets of variable-width values (OverflowError past 2 GiB, as Arrow's limit).

    The lengths are summed by Arrow: ``itertools.accumulate`` into an array took 90 ns a value.
    """
    lengths = array.array("i", (0,))
    lengths.extend(map(len, parts))
    as_array = pa.Array.from_buffers(pa.int32(), len(lengths), [None, pa.py_buffer(lengths)])
    try:
        return compute.cumulative_sum_checked(as_array).buffers()[1]
    except pa.ArrowInvalid as e:
        raise OverflowError(f"variable-width values over 2 GiB: {e}") from None
