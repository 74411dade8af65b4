"""Bad input, fuzzed: hypothesis draws arrays (shapes, dtypes, layouts), functions (right and
wrong), ``out`` arrays and grains for ``Pool.map`` / ``parrun.map`` / ``map_reduce``.

The oracle: each call gives what the serial computation gives, or raises ``TypeError`` /
``ValueError`` (or the very exception the serial call raises); never a hang, a dead worker or
a leaked segment. One pool serves every example.
"""

from __future__ import annotations

import gc
import operator
import os
import warnings

import numpy as np
import pytest
from conftest import shm_segments
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import parrun

CASES = {"tried": 0, "returned": 0, "refused": 0}

DTYPES = [np.bool_, np.int8, np.uint16, np.int64, np.float16, np.float32, np.float64,
          np.complex64, np.complex128, "datetime64[s]", "timedelta64[ms]", "U3", "S2",
          np.dtype([("a", np.int32), ("b", np.float64)]), object,
          np.dtype([("a", np.int16), ("o", object)])]

SHAPES = [(), (0,), (1,), (7,), (0, 3), (5, 0), (33, 3), (8, 2, 2), (200_000,), (60_000, 1)]

LAYOUTS = ["c", "fortran", "reversed", "strided", "readonly", "plain_view", "shared",
           "shared_view", "shared_readonly", "list"]


def make_array(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    n = int(np.prod(shape))
    if dt.kind in "iub":
        a = rng.integers(0, 100, n).astype(dt)
    elif dt.kind in "fc":
        a = (rng.standard_normal(n) * 10).astype(dt)
        if n > 3:
            a[1] = np.nan
    elif dt.kind in "mM":
        a = rng.integers(0, 10**6, n).astype(dt)
    elif dt.kind in "US":
        a = np.array([str(v) for v in rng.integers(0, 999, n)]).astype(dt)
    elif dt.kind == "O":
        a = np.array([object()] * n + [None])[:n] if n else np.empty(0, dt)
        a = a.astype(dt)
    else:  # structured
        a = np.zeros(n, dt)
        for name in dt.names:
            if dt[name].kind != "O":
                a[name] = rng.integers(0, 50, n)
    return a.reshape(shape)


def lay_out(a, layout):
    """The same values in another memory layout (where the layout applies to ``a``)."""
    if layout == "fortran" and a.ndim >= 2:
        return np.asfortranarray(a)
    if layout == "reversed" and a.ndim >= 1:
        return np.ascontiguousarray(a[::-1])[::-1]
    if layout == "strided" and a.ndim >= 1:
        big = np.repeat(a, 2, axis=0)
        return big[::2]
    if layout == "readonly":
        a = a.copy()
        a.flags.writeable = False
        return a
    if layout == "plain_view" and a.ndim >= 1:
        return np.concatenate([a, a[:1]])[:len(a)]
    if a.dtype.hasobject or layout not in ("shared", "shared_view", "shared_readonly",
                                           "list"):
        return a
    if layout == "list":
        return a.tolist()
    s = parrun.asshared(a)
    if layout == "shared_view" and a.ndim >= 1:
        s = s[::-1][::-1]
    if layout == "shared_readonly":
        s = s[...]
        s.flags.writeable = False
    return s


def _copy(t):
    return t.copy()


def _same(t):
    return t


def _double(t):
    return t * 2


def _is_equal(t):
    return t == t


def _as_f32(t):
    return t.astype(np.float32)


def _as_list(t):
    return t.tolist()


def _none(t):
    return None


def _scalar(t):
    return 3


def _twice_the_rows(t):
    return np.concatenate([t, t])


def _as_object(t):
    return t.astype(object)


def _first_only(t):
    return t.sum()


def _add_out(t, out):
    np.add(t, t, out=out)


FNS = [_copy, _same, _double, np.negative, np.sqrt, _is_equal, _as_f32, _as_list, _none,
       _scalar, _twice_the_rows, _as_object, _first_only, _add_out, "not callable"]

OUTS = ["none", "shared", "plain", "fortran", "reversed_shared", "wrong_rows", "wrong_tail",
        "float32", "int8", "readonly", "object", "zero_d", "list"]

GRAINS = [None, 0, -3, 1, 2, 7, 10**6, 10**15, 2.5, True, np.int64(3), "4"]


def serial(fn, x):
    """fn applied to the whole input in this process: the reference."""
    return fn(np.asarray(x))


def make_out(kind, ref, n):
    """An ``out`` of the kind asked for; shaped like the reference where there is one."""
    shape = getattr(ref, "shape", None) if isinstance(ref, np.ndarray) else None
    dtype = ref.dtype if isinstance(ref, np.ndarray) and not ref.dtype.hasobject \
        else np.dtype(np.float64)
    if shape is None or len(shape) == 0:
        shape = (n,)
    if kind == "shared":
        return parrun.zeros(shape, dtype)
    if kind == "plain":
        return np.zeros(shape, dtype)
    if kind == "fortran":
        return np.zeros(shape, dtype, order="F")
    if kind == "reversed_shared":
        return parrun.zeros(shape, dtype)[::-1]
    if kind == "wrong_rows":
        return np.zeros((shape[0] + 1, *shape[1:]), dtype)
    if kind == "wrong_tail":
        return np.zeros((*shape, 2), dtype)
    if kind in ("float32", "int8"):
        return parrun.zeros(shape, kind)
    if kind == "readonly":
        o = np.zeros(shape, dtype)
        o.flags.writeable = False
        return o
    if kind == "object":
        return np.zeros(shape, object)
    if kind == "zero_d":
        return np.zeros((), dtype)
    if kind == "list":
        return [0] * shape[0]
    raise AssertionError(kind)


def expected_into(out, ref):
    """What ``out`` should hold after a map that succeeds, or None if the serial rules
    (one row per input row, same-kind casting) refuse it."""
    if not isinstance(out, np.ndarray) or ref is None:
        return None
    ref = np.asarray(ref)
    if ref.shape != out.shape or ref.dtype.hasobject:
        return None
    want = np.zeros_like(out)
    try:
        np.copyto(want, ref, casting="same_kind")
    except TypeError:
        return None
    return want


def assert_same(got, want):
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    if want.dtype.kind in "fc":
        np.testing.assert_array_equal(got, want)  # NaNs compare equal here
    else:
        assert (np.asarray(got) == np.asarray(want)).all()


@pytest.fixture(scope="module")
def fuzz_pool():
    with parrun.Pool(2) as p:
        yield p
    print(f"\nfuzz: {CASES}")


def _takes_out(fn) -> bool:
    return isinstance(fn, np.ufunc) or fn is _add_out


def _reference(fn, x, out):
    """(what ``out`` or the result should hold, or None; the serial error, or None). With
    ``out``, a function that takes ``out`` is called with it, as map calls it per piece."""
    try:
        if out is None or not isinstance(out, np.ndarray):
            return serial(fn, x), None
        if _takes_out(fn):
            want = np.zeros_like(out)
            fn(np.asarray(x), out=want)
            return want, None
        return expected_into(out, serial(fn, x)), None
    except Exception as e:
        return None, e


def check_case(pool, x, fn, out_kind, grain, use_module_api):
    CASES["tried"] += 1
    pids = list(pool.pids)
    before = shm_segments(os.getpid())
    n = np.asarray(x).shape[0] if np.ndim(x) else 0
    with warnings.catch_warnings():  # complex -> float casts, sqrt of negatives
        warnings.simplefilter("ignore")
        try:
            shape_ref = serial(fn, x)
        except Exception:
            shape_ref = None
        out = None if out_kind == "none" else make_out(out_kind, shape_ref, n)
        want, ref_error = _reference(fn, x, out)
        call = (lambda: parrun.map(fn, x, out=out, grain=grain, pool=pool)) \
            if use_module_api else (lambda: pool.map(fn, x, out=out, grain=grain))
        try:
            result = call()
        except (TypeError, ValueError) as e:
            CASES["refused"] += 1
            assert str(e), "an error without a message"
        except Exception as e:
            # Anything else must be what the serial call raised too (fn's own error).
            assert ref_error is not None and type(e) is type(ref_error), (e, ref_error)
            assert isinstance(e.__cause__, parrun.RemoteTraceback) or n == 0
            CASES["refused"] += 1
        else:
            CASES["returned"] += 1
            if out is None:
                assert ref_error is None, f"parrun returned where serial raised {ref_error!r}"
                assert isinstance(result, parrun.SharedArray)
                assert_same(result, np.asarray(want))
                result.release()
            elif n == 0:  # no rows: fn is never called, out is left as it was
                assert result is out and np.asarray(out).size == 0
            else:
                assert result is out
                assert ref_error is None and want is not None, \
                    f"parrun accepted what serial rules refuse ({ref_error!r})"
                assert_same(np.asarray(out), want)
        finally:
            for a in (out, x):
                if isinstance(a, parrun.SharedArray):
                    a.release()
    # Never a crashed worker, never a leaked segment (the pool may keep what its maps made).
    assert pool.pids == pids, "a worker died"
    leaked = shm_segments(os.getpid()) - before - pool._own_segments()
    if leaked:
        gc.collect()
        leaked = shm_segments(os.getpid()) - before - pool._own_segments()
    assert not leaked, leaked


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(shape=st.sampled_from(SHAPES), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(LAYOUTS), fn=st.sampled_from(FNS), out=st.sampled_from(OUTS),
       grain=st.sampled_from(GRAINS), seed=st.integers(0, 2**16),
       module_api=st.booleans())
def test_map_fuzzed(fuzz_pool, shape, dtype, layout, fn, out, grain, seed, module_api):
    x = lay_out(make_array(shape, dtype, seed), layout)
    check_case(fuzz_pool, x, fn, out, grain, module_api)


def _rows(t):
    return t.shape[0]


def _nonzero(t):
    return np.count_nonzero(t)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(shape=st.sampled_from(SHAPES), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(LAYOUTS), fn=st.sampled_from([_rows, _nonzero]),
       grain=st.sampled_from(GRAINS), seed=st.integers(0, 2**16),
       initial=st.sampled_from([None, 0]))
def test_map_reduce_fuzzed(fuzz_pool, shape, dtype, layout, fn, grain, seed, initial):
    CASES["tried"] += 1
    x = lay_out(make_array(shape, dtype, seed), layout)
    pids = list(fuzz_pool.pids)
    before = shm_segments(os.getpid())
    kw = {} if initial is None else {"initial": initial}
    try:
        ref = fn(np.asarray(x)) if np.ndim(x) else None
    except Exception:
        ref = None
    try:
        got = fuzz_pool.map_reduce(fn, operator.add, x, grain=grain, **kw)
    except (TypeError, ValueError) as e:
        CASES["refused"] += 1
        assert str(e)
    else:
        CASES["returned"] += 1
        n = np.asarray(x).shape[0]
        if n == 0:
            assert initial is not None and got == initial
        else:
            assert ref is not None and got == ref + (initial or 0), (got, ref)
    finally:
        if isinstance(x, parrun.SharedArray):
            x.release()
    assert fuzz_pool.pids == pids
    assert shm_segments(os.getpid()) - before - fuzz_pool._own_segments() == set()


def test_release_of_an_empty_view_that_points_past_its_segment():
    """Found by the fuzzer: ``release()`` on ``a[::-1]`` of shape (5, 0) did nothing (its
    data pointer lies past the 1-byte segment), so the segment stayed until a was collected."""
    a = parrun.zeros((5, 0), bool)
    name = a.segment
    a[::-1].release()
    assert name not in shm_segments()


def test_ufunc_into_an_out_of_another_shape_is_refused(fuzz_pool):
    """Found by the fuzzer: np.sqrt of (7,) into an out of (7, 2) with grain=1 filled both
    columns (each (1,) piece broadcast into its (1, 2) slice); serially it is an error."""
    with pytest.raises(ValueError, match=r"out has shape \(7, 2\), but sqrt"):
        fuzz_pool.map(np.sqrt, np.ones(7), out=np.zeros((7, 2)), grain=1)


def test_fuzzing_tried_enough_cases(fuzz_pool):
    """Runs after the fuzzers (file order): they tried what they were asked to."""
    assert CASES["tried"] >= 200, CASES
    assert CASES["returned"] >= 30 and CASES["refused"] >= 30, CASES
