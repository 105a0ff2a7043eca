"""The one JSON sanitiser: any result dkn produces -> plain, strict JSON types.

`jsonable(obj)` maps dicts (keys -> str), lists, tuples and sets (-> lists), numpy arrays and scalars,
dataclasses (-> dicts of their fields), paths (-> str) and bytes (-> hex) to JSON types; NaN and
infinities become None (strict JSON has no NaN).  Anything else becomes its `str()` when
`default=str` (the CLI's choice) or raises a TypeError.  `dumps` is `json.dumps(jsonable(obj))` with
`allow_nan=False`.  Imports only numpy (no torch): the CLI uses it on its fast path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np


def jsonable(obj: Any, default: Callable[[Any], Any] | None = None) -> Any:
    """`obj` as plain JSON types, NaN/inf -> None (see the module docstring)."""
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, (int, float, np.generic)):
        return _scalar(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v, default) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, default) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((jsonable(v, default) for v in obj), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist(), default)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name), default) for f in dataclasses.fields(obj)}
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj).hex()
    if hasattr(obj, "tolist") and callable(obj.tolist):  # torch tensors, pandas arrays
        return jsonable(obj.tolist(), default)
    if default is not None:
        return jsonable(default(obj))
    raise TypeError(f"cannot turn a {type(obj).__name__} into JSON")


def _scalar(value: Any) -> Any:
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(obj: Any, *, default: Callable[[Any], Any] | None = str, **kwargs: Any) -> str:
    """Strict JSON text of `obj` (NaN/inf -> null; other objects via `default`, str by default)."""
    return json.dumps(jsonable(obj, default), allow_nan=False, **kwargs)
