"""Task functions: pickled once, pickled again when what they capture changes.

A function is cloudpickled for the workers (and keyed by a hash of the bytes, which is how
workers cache it). Pickling a lambda costs ~70 us and a script's function ~200 us, too much
for every call, so the pickle is cached per function object (a bound method per function
and object, as ``obj.method`` is a new object each time) and reused while what cloudpickle
would capture by value is unchanged:

- its code, defaults, closure cells and the global variables its code reads; one level
  down for a ``functools.partial`` (its arguments), a bound method (its object's
  attributes) or a callable object (its attributes and its ``__call__``);
- each compared by identity, so a rebound name (``k = 3``) is seen: held weakly where it
  can be (so the cache keeps no array or object alive), else (a tuple, list, dict or NumPy
  scalar) held until the function is next used or dies; numbers and strings by value; and a
  small plain NumPy array (up to ``COMPARE_BYTES``) by its bytes, shape and dtype too, so an
  in-place change (``w[0] = 3``) is seen.

Not seen: a change deeper down (a global read by a function that ``fn`` calls, a class
attribute, an item of a captured list or dict) or inside a bigger plain array. Put such
state in shared memory (``parrun.asshared``), which workers read live, or pass it as an
argument.
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
from ._checks import out_position

# Functions whose pickles are kept (the least recently used go first).
CACHE_SIZE = 256
# A captured plain array up to this size is compared by its bytes on every call (a copy and
# a memcmp: ~1 us at 16 KiB; a hash of them was ~40 us).
COMPARE_BYTES = 16 * 1024

_ATOMS = (int, float, complex, str, bytes, bool, type(None))


@dataclass(slots=True)
class _Entry:
    refs: tuple[Callable[[], Any], ...]  # to what the function is (see _anchors)
    tokens: list[tuple]  # what it captured (see _token)
    key: bytes
    data: bytes
    out_at: float | None  # where fn takes out (_checks.out_position)
    names: frozenset[str]  # the segments the pickle names


# _anchors(fn)[0] -> _Entry. An entry goes when an anchor dies (so its ids are not reused
# by another function while the entry lives).
_pickled: OrderedDict[tuple, _Entry] = OrderedDict()
_lock = threading.Lock()


def _token(v: Any) -> tuple:
    """What tells, on a later call, that ``v`` is still what was pickled (see _same)."""
    if type(v) in _ATOMS:
        return (0, v)
    try:
        ref = weakref.ref(v)
    except TypeError:  # a tuple, list, dict, NumPy scalar: held (an id could be reused)
        return (3, v)
    if _by_bytes(v):
        return (2, ref, v.tobytes(), v.shape, v.dtype)
    return (1, ref)


def _same(token: tuple, v: Any) -> bool:
    kind, was = token[0], token[1]
    if kind == 1:
        return was() is v
    if kind == 0:  # by value; floats by their bits (nan is itself, -0.0 is not 0.0)
        return was is v or (type(v) is type(was) and v == was
                            and (type(v) not in (float, complex) or repr(v) == repr(was)))
    if kind == 2:
        return (was() is v and v.shape == token[3] and v.dtype == token[4]
                and v.tobytes() == token[2])
    return was is v


@functools.lru_cache(maxsize=1024)
def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """The global names ``code`` and the code nested in it (lambdas, comprehensions) read."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_global_names(const))
    return tuple(sorted(names))


def _anchors(fn: Any, objs: list[Any]) -> tuple[tuple, tuple[Any, ...]]:
    """(a cache key, the objects it names): what ``fn`` is. A bound method is made anew at
    each attribute access (``obj.method``, ``arr.sum``), so it is keyed by its function and
    object, which live on, if what it captures (``objs``) is all seen when it changes
    (``_seen``); else by itself, a miss at every call, as before such keys: ``arr.sum``
    after ``arr[:] = 1`` on a big plain array must not reuse the old pickle. Anything else
    by itself."""
    if isinstance(fn, types.MethodType):
        if (_weak(fn.__func__) and _weak(fn.__self__)
                and all(map(_seen, objs[1:]))):  # (objs[0] is the object itself)
            return ("method", id(fn.__func__), id(fn.__self__)), (fn.__func__, fn.__self__)
    elif isinstance(fn, (types.BuiltinMethodType, types.MethodWrapperType)):
        owner = getattr(fn, "__self__", None)
        if (owner is not None and not isinstance(owner, types.ModuleType) and _weak(owner)
                and all(map(_seen, objs))):
            return (type(fn), fn.__name__, id(owner)), (owner,)
    return (id(fn),), (fn,)


# What the function cache compares in full: by value, or immutable, or code and classes.
_LEAVES = (types.FunctionType, types.BuiltinFunctionType, types.CodeType, types.ModuleType,
           type, np.ufunc, np.generic, np.dtype)


def _seen(v: Any) -> bool:
    """Whether a change to ``v`` is seen by the token comparison (``_same``): a value, a
    small plain array (its bytes), a shared array (workers read it live), a function or
    class. Not an object's or a container's contents, nor a big plain array's."""
    if type(v) in _ATOMS or isinstance(v, _LEAVES):
        return True
    if isinstance(v, np.ndarray):
        return _by_bytes(v) or _shm.is_shared(v)
    return False


def _by_bytes(v: Any) -> bool:
    """Whether ``v`` is a small plain array, compared by its bytes."""
    return type(v) is np.ndarray and v.nbytes <= COMPARE_BYTES and not v.dtype.hasobject


def _weak(obj: Any) -> bool:
    """Whether ``obj`` can be weakly referenced, or held (a ufunc: ``np.add.reduce``). Else
    a bound method of it is keyed by itself, as an entry by its object would hold the
    object, and so the entry dies with the method: a miss on the next call."""
    return type(obj).__weakrefoffset__ != 0 or isinstance(obj, np.ufunc)


def _captured(fn: Any) -> list[Any]:
    """The objects ``fn`` carries along when pickled by value, one level deep."""
    if isinstance(fn, np.ufunc):
        return []
    if isinstance(fn, (types.BuiltinFunctionType, types.MethodWrapperType)):  # w.__mul__
        owner = getattr(fn, "__self__", None)
        return [] if owner is None or isinstance(owner, types.ModuleType) else [owner]
    if isinstance(fn, functools.partial):
        return [fn.func, *_captured(fn.func), *fn.args, *fn.keywords.values()]
    if isinstance(fn, types.MethodType):
        return [fn.__self__, *_attributes(fn.__self__), *_captured(fn.__func__)]
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType):  # a callable object
        call = type(fn).__call__
        return [type(fn), *_attributes(fn),
                *(_captured(call) if isinstance(call, types.FunctionType) else ())]
    defaults = getattr(fn, "__defaults__", None)  # (a numba kernel has a __code__ only)
    out: list[Any] = [code, *(defaults or ()),
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
    out = list(d.values()) if isinstance(d, dict) else []
    for cls in type(obj).__mro__:
        slots = vars(cls).get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__"):
                out.append(getattr(obj, name, None))
    return out


def pickle_function(fn: Any, what: str = "fn",
                    ) -> tuple[bytes, bytes, float | None, frozenset[str]]:
    """Cloudpickle ``fn``, or reuse its last pickle if nothing it captures changed; return
    (key, bytes, where fn takes ``out`` (``_checks.out_position``), the segments the pickle
    names), the key being a hash of the bytes."""
    if not callable(fn):
        raise TypeError(f"{what} must be callable, got {type(fn).__name__}")
    objs = _captured(fn)
    fid, anchors = _anchors(fn, objs)
    hit = _pickled.get(fid)  # a dict read is atomic: no lock on the hot path
    if (hit is not None and all(r() is a for r, a in zip(hit.refs, anchors))
            and len(hit.tokens) == len(objs) and all(map(_same, hit.tokens, objs))):
        return hit.key, hit.data, hit.out_at, hit.names
    try:
        data, names = _shm.dumps_naming(fn)
    except Exception as e:
        raise TypeError(f"{what} could not be pickled (cloudpickle): "
                        f"{type(e).__name__}: {e}") from e
    entry = _Entry(tuple(_ref(a, fid) for a in anchors), [_token(v) for v in objs],
                   hashlib.blake2b(data, digest_size=16).digest(), data, out_position(fn),
                   names)
    with _lock:
        _pickled.pop(fid, None)
        _pickled[fid] = entry  # at the end: the least recently pickled go first
        while len(_pickled) > CACHE_SIZE:
            _pickled.popitem(last=False)
    return entry.key, entry.data, entry.out_at, entry.names


def _ref(obj: Any, fid: tuple) -> Callable[[], Any]:
    try:
        # Weakly: the entry must not keep ``fn`` (and the shared arrays it holds) alive.
        return weakref.ref(obj, lambda r: _forget(fid, r))
    except TypeError:  # not weakly referenceable (a few builtins): held
        return lambda: obj


def _forget(fid: tuple, ref: Callable[[], Any]) -> None:
    # A weakref callback runs wherever the collector does, maybe inside ``with _lock``: no
    # lock here. Losing a race with a new entry for ``fid`` costs only a cache miss.
    e = _pickled.get(fid)
    if e is not None and any(r is ref for r in e.refs):
        _pickled.pop(fid, None)
