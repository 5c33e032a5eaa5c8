"""Cohort students set up one at a time, then trained together: while one student seeds and builds its model,
no other thread draws from torch's global generator, so each starts exactly as it would alone."""

from __future__ import annotations

import threading


class SetupTurns:
    """Students set up one at a time, then all train. A member that fails in its turn still counts as set up."""

    def __init__(self, n: int) -> None:
        self._gate = threading.Lock()
        self._cond = threading.Condition()
        self._waiting = n

    def turn(self) -> "Turn":
        return Turn(self)

    def _arrive(self) -> None:
        with self._cond:
            self._waiting -= 1
            self._cond.notify_all()

    def _wait_all(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._waiting <= 0)


class Turn:
    def __init__(self, turns: SetupTurns) -> None:
        self.turns = turns
        self.holding = False
        self.arrived = False

    def begin(self) -> None:
        self.turns._gate.acquire()
        self.holding = True

    def done(self) -> None:
        """Called by the trainer once it is set up: the next student's turn; back when every student is set up."""
        self._release()
        self.turns._wait_all()

    def end(self) -> None:
        """The thread is over, whatever happened: never leave the gate held or the others waiting."""
        self._release()

    def _release(self) -> None:
        if self.holding:
            self.holding = False
            self.turns._gate.release()
        if not self.arrived:
            self.arrived = True
            self.turns._arrive()
