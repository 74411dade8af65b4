"""Task functions: pickled once, pickled again when what they capture changes.

A function is cloudpickled for the workers (and keyed by a hash of the bytes, which is how
workers cache it). Pickling a lambda costs ~70 us and a script's function ~200 us, too much
for every call, so the pickle is cached per function object and reused while the function's
*fingerprint* is unchanged: what cloudpickle would capture by value,

- its code, defaults, closure cells and the global variables its code reads (one level down
  for a ``functools.partial``, a bound method or a callable object: its attributes);
- held by identity, so a rebound name (``k = 3``) is seen; and for a small plain NumPy array
  among them, also a digest of its bytes, so an in-place change (``w[0] = 3``) is seen.

Not seen: an in-place change inside a container or a plain array bigger than
``DIGEST_BYTES``; put such state in shared memory (``parrun.asshared``), which workers read
live, or pass it as an argument.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _shm
from ._checks import accepts_out

# Functions whose pickles are kept (the least recently used go first).
CACHE_SIZE = 256
# A captured plain array up to this size is digested on every call (~5 us at 64 KiB).
DIGEST_BYTES = 64 * 1024


@dataclass(slots=True)
class _Entry:
    ref: Callable[[], Any]  # to the function
    objs: list[Any]  # what it captured, compared by identity
    digests: tuple  # of the small plain arrays among objs
    key: bytes
    data: bytes
    takes_out: bool
    names: frozenset[str]  # the segments the pickle names


# id(fn) -> _Entry. An entry goes when its function dies (so the id is not reused by
# another function while the entry lives).
_pickled: OrderedDict[int, _Entry] = OrderedDict()
_lock = threading.Lock()


@functools.lru_cache(maxsize=1024)
def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """The global names ``code`` and the code nested in it (lambdas, comprehensions) read."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_global_names(const))
    return tuple(sorted(names))


def _captured(fn: Any) -> list[Any]:
    """The objects ``fn`` carries along when pickled by value, one level deep."""
    if isinstance(fn, (np.ufunc, types.BuiltinFunctionType)):
        return []
    if isinstance(fn, functools.partial):
        return [fn.func, *_captured(fn.func), *fn.args, *fn.keywords.values()]
    if isinstance(fn, types.MethodType):
        return [fn.__self__, *_attributes(fn.__self__), *_captured(fn.__func__)]
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType):  # a callable object
        return [type(fn), *_attributes(fn)]
    defaults = getattr(fn, "__defaults__", None)  # (a numba kernel has a __code__ only)
    out: list[Any] = [code, defaults, *(defaults or ()),
                      *(getattr(fn, "__kwdefaults__", None) or {}).values()]
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            out.append(cell.cell_contents)
        except ValueError:  # an empty cell
            out.append(None)
    g = getattr(fn, "__globals__", {})
    out.extend(g.get(name) for name in _global_names(code))
    return out


def _attributes(obj: Any) -> list[Any]:
    d = getattr(obj, "__dict__", None)
    return list(d.values()) if isinstance(d, dict) else []


def _digests(objs: list[Any]) -> tuple:
    """Digests of the small plain arrays among ``objs`` (a change in place shows here)."""
    out = []
    for v in objs:
        if type(v) is np.ndarray and v.nbytes <= DIGEST_BYTES and not v.dtype.hasobject:
            out.append(hashlib.blake2b(np.ascontiguousarray(v).view(np.uint8).data,
                                       digest_size=16).digest())
    return tuple(out)


def pickle_function(fn: Any, what: str = "fn") -> tuple[bytes, bytes, bool, frozenset[str]]:
    """Cloudpickle ``fn``, or reuse its last pickle if nothing it captures changed; return
    (key, bytes, whether fn takes ``out``, the segments the pickle names), the key being a
    hash of the bytes."""
    if not callable(fn):
        raise TypeError(f"{what} must be callable, got {type(fn).__name__}")
    objs = [v for v in _captured(fn) if v is not fn]  # a recursive fn would hold itself
    digests = _digests(objs)
    hit = _pickled.get(id(fn))  # a dict read is atomic: no lock on the hot path
    if (hit is not None and hit.ref() is fn and hit.digests == digests
            and len(hit.objs) == len(objs) and all(a is b for a, b in zip(hit.objs, objs))):
        return hit.key, hit.data, hit.takes_out, hit.names
    try:
        data, names = _shm.dumps_naming(fn)
    except Exception as e:
        raise TypeError(f"{what} could not be pickled (cloudpickle): "
                        f"{type(e).__name__}: {e}") from e
    fid = id(fn)
    ref: Callable[[], Any]
    try:
        # Weakly: the entry must not keep ``fn`` (and the shared arrays it holds) alive.
        ref = weakref.ref(fn, lambda r: _forget(fid, r))
    except TypeError:
        ref = lambda: fn  # noqa: E731 - not weakly referenceable (a few builtins): held
    entry = _Entry(ref, objs, digests, hashlib.blake2b(data, digest_size=16).digest(), data,
                   accepts_out(fn), names)
    with _lock:
        _pickled.pop(fid, None)
        _pickled[fid] = entry  # at the end: the least recently pickled go first
        while len(_pickled) > CACHE_SIZE:
            _pickled.popitem(last=False)
    return entry.key, entry.data, entry.takes_out, entry.names


def _forget(fid: int, ref: Callable[[], Any]) -> None:
    # A weakref callback runs wherever the collector does, maybe inside ``with _lock``: no
    # lock here. Losing a race with a new entry for ``fid`` costs only a cache miss.
    e = _pickled.get(fid)
    if e is not None and e.ref is ref:
        _pickled.pop(fid, None)
