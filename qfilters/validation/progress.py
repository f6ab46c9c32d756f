"""Progress events of a validation run, and the points where a caller can stop it.

A caller's ``on_progress`` gets one :class:`Progress` per calibration batch and per evaluation forward pass; between
two events, the latest one is sent again before every attention layer (:func:`interruptible`), so a caller that
raises from its callback (a cancelled job) stops the run within a fraction of a forward pass, however large the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Progress:
    """One progress event: ``phase`` (calibrate / evaluate / transfer), a label, and work done out of total."""

    phase: str
    label: str
    completed: int
    total: int
    detail: str = ""


ProgressFn = Callable[[Progress], None]


def notifier(on_progress: ProgressFn | None) -> tuple[ProgressFn, Callable[[], None] | None]:
    """``notify`` (sends an event, remembering it) and ``interrupt`` (sends the latest event again): called between
    two layers of every forward pass, it gives the caller a point to stop from within seconds even when one pass of
    a large model takes long (raising in the callback stops the run)."""
    if on_progress is None:
        return (lambda p: None), None
    latest: list[Progress] = []

    def notify(p: Progress) -> None:
        latest[:] = [p]
        on_progress(p)

    return notify, lambda: on_progress(latest[0]) if latest else None


@contextmanager
def interruptible(model: Any, interrupt: Callable[[], None] | None) -> Iterator[None]:
    """Call ``interrupt`` before the forward of every attention layer of ``model`` inside the block."""
    if interrupt is None:
        yield
        return
    from qfilters.attention import attention_layers

    def before_layer(*_: Any) -> None:  # returns None: a forward pre-hook that returns something replaces the input
        interrupt()

    handles = [layer.register_forward_pre_hook(before_layer) for layer in attention_layers(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
