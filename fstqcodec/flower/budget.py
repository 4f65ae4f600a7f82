"""Per-client uplink budgets for :class:`fstqcodec.flower.FstqStrategy` (no Flower import)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import fstqcodec

__all__ = ["LinkBudget"]


@dataclasses.dataclass(frozen=True)
class LinkBudget:
    """Give each client the bytes its uplink can carry within the round's deadline.

    An instance is a callable ``(node_id, server_round) -> Budget`` and can be passed as
    ``FstqStrategy(budget=...)``. Each client's budget is
    ``fstqcodec.Budget.for_link(bandwidth_bps, deadline_s)``: the whole fstq message, every byte
    counted, fits in what its link carries before the deadline; but never less than
    ``min_bytes``.

    Parameters
    ----------
    bandwidth_bps : Mapping[int, float] or Callable[[int], float]
        The uplink bandwidth of each client in bits per second, by Flower node id.
    deadline_s : float
        Seconds each client may spend sending its update.
    default_bps : float or None
        Bandwidth assumed for a node missing from the mapping; ``None`` makes a missing node an
        error (``KeyError``), so that a mistake in the node ids does not pass silently.
    min_bytes : int
        The smallest budget given (a message needs room for its header: a slow client gets a
        budget its link misses the deadline with, rather than one the encoder must refuse).

    Raises
    ------
    ValueError
        If ``deadline_s`` or ``default_bps`` is not positive and finite, or ``min_bytes`` < 1.

    Examples
    --------
    >>> budget = LinkBudget({101: 8e6, 202: 1e6}, deadline_s=2.0)
    >>> budget(202, server_round=1)
    Budget(max_bytes=250000)
    """

    bandwidth_bps: Mapping[int, float] | Callable[[int], float]
    deadline_s: float
    default_bps: float | None = None
    min_bytes: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.min_bytes, bool) or not isinstance(self.min_bytes, int) or self.min_bytes < 1:
            raise ValueError(f"min_bytes must be an int >= 1, got {self.min_bytes!r}")
        if not (math.isfinite(self.deadline_s) and self.deadline_s > 0):
            raise ValueError(f"deadline_s must be positive and finite, got {self.deadline_s!r}")
        if self.default_bps is not None and not (
            math.isfinite(self.default_bps) and self.default_bps > 0
        ):
            raise ValueError(f"default_bps must be positive and finite, got {self.default_bps!r}")

    def __call__(self, node_id: int, server_round: int) -> fstqcodec.Budget:
        """Return the budget of ``node_id`` (the round does not change it)."""
        if callable(self.bandwidth_bps):
            bandwidth = self.bandwidth_bps(node_id)
        elif node_id in self.bandwidth_bps:
            bandwidth = self.bandwidth_bps[node_id]
        elif self.default_bps is not None:
            bandwidth = self.default_bps
        else:
            raise KeyError(f"LinkBudget has no bandwidth for node {node_id} and no default")
        if not (math.isfinite(bandwidth) and bandwidth > 0):
            raise ValueError(f"bandwidth of node {node_id} must be positive, got {bandwidth!r}")
        link = fstqcodec.Budget.for_link(bandwidth_bps=bandwidth, deadline_s=self.deadline_s)
        return fstqcodec.Budget(max_bytes=max(self.min_bytes, link.max_bytes))
