"""Orbax checkpoints of a work directory: ``checkpoints/latest`` (to resume) and ``checkpoints/best`` (to evaluate).

Two ``orbax.checkpoint.CheckpointManager`` s, because the two answer different questions:

* ``latest`` keeps the 2 most recent full train states (step, parameters, optimizer state); a run resumes from the
  newest. Two, so that a process killed while writing one still leaves the previous one.
* ``best`` keeps the parameters with the highest validation IoU (``BestN`` preservation on the ``iou`` metric that is
  saved with each one). ``evaluate`` and ``predict`` read it, falling back to ``latest`` when no validation ran.

Saves are asynchronous (Orbax copies the arrays to the host before ``save`` returns, then writes in a background
thread); :meth:`Checkpoints.close` waits for them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import BestN, LatestN

from .errors import CheckpointError

log = logging.getLogger(__name__)

KEEP_LATEST = 2
BEST_METRIC = "iou"


def _best_metric(metrics: dict) -> float:
    return float(metrics[BEST_METRIC])


class Checkpoints:
    """The ``latest`` and ``best`` checkpoint managers of ``workdir``; use as a context manager."""

    def __init__(self, workdir: Path, *, read_only: bool = False):
        self.root = Path(workdir).resolve() / "checkpoints"
        self.read_only = read_only
        self._best_iou: float | None = None
        self.latest = self._manager("latest", preservation_policy=LatestN(n=KEEP_LATEST))
        # best_fn makes the manager store each checkpoint's metrics and rank them (best_step); BestN keeps one.
        self.best = self._manager("best", preservation_policy=BestN(get_metric_fn=_best_metric, n=1),
                                  best_fn=_best_metric, best_mode="max")

    def _manager(self, name: str, **options) -> ocp.CheckpointManager | None:
        directory = self.root / name
        if self.read_only and not directory.is_dir():
            return None
        options = ocp.CheckpointManagerOptions(read_only=self.read_only, create=not self.read_only, **options)
        return ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        return self.latest.latest_step() if self.latest else None

    def best_step(self) -> int | None:
        return self.best.best_step() if self.best else None

    def best_iou(self) -> float | None:
        """Validation IoU of the best checkpoint (remembered here: a save still in flight has no metrics on disk)."""
        if self._best_iou is None:
            step = self.best_step()
            metrics = self.best.metrics(step) if step is not None else None
            self._best_iou = _best_metric(metrics) if metrics else None
        return self._best_iou

    def save_latest(self, step: int, state: Any) -> None:
        self.latest.save(step, args=ocp.args.StandardSave(state))

    def save_best(self, step: int, params: Any, iou: float) -> bool:
        """Save ``params`` as the best when ``iou`` beats the best so far; True when saved."""
        best = self.best_iou()
        if best is not None and iou <= best:
            return False
        self.best.save(step, args=ocp.args.StandardSave(params), metrics={BEST_METRIC: float(iou)})
        self._best_iou = float(iou)
        return True

    def restore_latest(self, abstract_state: Any) -> Any:
        step = self.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.root / 'latest'}")
        return self.latest.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def restore_params(self, abstract_params: Any, abstract_state: Any, *, which: str = "best",
                       from_state: Callable[[Any], Any] = lambda state: state.params) -> tuple[Any, str, int]:
        """Parameters of the best checkpoint (``which="best"``), else of the latest, or of the latest alone
        (``which="latest"``): ``(params, "best" | "latest", step)``. ``from_state`` picks the parameters of a full
        train state (the latest checkpoints hold those)."""
        if which not in ("best", "latest"):
            raise ValueError(f"which must be 'best' or 'latest', not {which!r}")
        step = self.best_step() if which == "best" else None
        if step is not None:
            return self.best.restore(step, args=ocp.args.StandardRestore(abstract_params)), "best", step
        step = self.latest_step()
        if step is not None:
            if which == "best":
                log.warning("no best checkpoint in %s (no validation ran); using the latest, step %d", self.root, step)
            return from_state(self.restore_latest(abstract_state)), "latest", step
        raise CheckpointError(
            f"no checkpoint in {self.root}: train first with `trainer train --workdir {self.root.parent}`"
        )

    def close(self) -> None:
        for manager in (self.latest, self.best):
            if manager is not None:
                manager.wait_until_finished()
                manager.close()

    def __enter__(self) -> "Checkpoints":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
