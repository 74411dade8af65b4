"""The plain records that cross the process boundary (pickled with plain ``pickle``).

Array handles are tuples made by ``_shm.handle_of``; functions travel as cloudpickle bytes in a
``Function`` record once per worker, and jobs refer to them by key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class _Nothing:
    """Marks 'no value' where None is a legitimate value (a reduction's accumulator)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __reduce__(self):
        return _Nothing, ()

    def __repr__(self) -> str:
        return "NOTHING"


NOTHING = _Nothing()


@dataclass(frozen=True)
class Function:
    """Parent -> worker: cache this cloudpickled function under ``key``."""

    key: bytes
    data: bytes


@dataclass(frozen=True)
class Forget:
    """Parent -> worker: drop these segments' mappings and these cached functions; sent
    before any function or job that follows them."""

    segments: tuple
    fns: tuple


@dataclass(frozen=True)
class Job:
    """Parent -> worker: run pieces of the ranges in the control block.

    ``inputs``/``out`` are array handles. With ``out`` set, piece ``[lo, hi)`` stores
    ``fn(*(a[lo:hi] for a in inputs))`` into ``out[lo:hi]``; with ``reduce_key`` set, pieces
    are folded into one partial result per worker instead; with neither (map learning the
    shape of its ``out``), each worker sends back its pieces as ``[(lo, hi, result), ...]``.
    """

    job_id: int
    fn_key: bytes
    inputs: tuple
    out: tuple | None
    grain: int
    reduce_key: bytes | None = None
    solo: bool = False  # one worker engaged: no thieves, so no locks needed
    adaptive: bool = False  # size pieces by measured cost, up to ``grain``
    ns_per_item: float = 0.0  # cost per item measured on an earlier job (0: unknown)
    pass_out: bool = False  # call fn(*pieces, out=out_piece): it writes in place
    made_out: bool = False  # map made ``out`` from the first piece: no narrowing casts into it


@dataclass(frozen=True)
class Stop:
    """Parent -> worker: exit the main loop."""


@dataclass(frozen=True)
class Ready:
    """Worker -> parent: started and attached to the control block."""

    slot: int
    pid: int


@dataclass(frozen=True)
class Done:
    """Worker -> parent: finished its part of job ``job_id``.

    ``error`` is a transportable exception (it unpickles with the worker's traceback as its
    cause) or None; ``partial`` is the worker's reduction, or ``NOTHING``.
    """

    job_id: int
    slot: int
    error: Any
    partial: Any


@dataclass(frozen=True)
class BadFunction:
    """Worker-side placeholder for a function that failed to unpickle."""

    message: str


@dataclass(frozen=True)
class TaskWake:
    """Parent -> worker: serve tasks from the control block until none is left.

    Task ``tid``'s payload lies in slot ``tid % cap`` of the arena segment: an int64 length
    L, the 16-byte function key, then the pickled ``(args, kwargs)`` of L bytes; or, when
    L < 0, the name of a segment that holds those -L bytes (a 64-byte field).
    """

    arena: str
    cap: int
    slot_bytes: int
    seq: int = 0  # echoed in the worker's idle report: the parent counts wake-ups answered


@dataclass(frozen=True)
class TaskResults:
    """Worker -> parent: the outcome of one piece of tasks.

    ``results`` holds ``(tid, ok, payload)``: ``payload`` is the pickled result if ``ok``,
    else a pickled transportable exception.
    """

    slot: int
    results: list
    busy_ns: int
    idle: bool = False  # nothing was left to take or steal: the worker is going idle
    seq: int = 0  # the TaskWake this serving round answers
    partial: bool = False  # tasks done so far in a piece still running (see _Reporter)


@dataclass(frozen=True)
class Idle:
    """Worker -> parent: found no task to take or steal; back to waiting."""

    slot: int
    seq: int = 0  # the TaskWake this serving round answers


@dataclass(frozen=True)
class InitFailed:
    """Worker -> parent: the pool's initializer raised; the worker exits."""

    slot: int
    error: Any
