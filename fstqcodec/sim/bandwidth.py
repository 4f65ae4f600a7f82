"""Heterogeneous edge links and the simulated wall-clock of a synchronous round."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["LinkModel", "ClientLinks", "round_time"]


@dataclass(frozen=True)
class LinkModel:
    """Log-normal per-client link bandwidths.

    Each client's uplink bandwidth is ``median_uplink_mbps * exp(sigma * z)`` with ``z`` standard
    normal, and likewise for the downlink, drawn once per client from ``seed``. The defaults model
    edge devices: a 1 Mbit/s median uplink, 10 Mbit/s median downlink, and a spread (sigma 1.0) under
    which the slowest of 10 clients is typically 3-5x below the median. ``latency_s`` is added once
    per transfer.
    """

    median_uplink_mbps: float = 1.0
    median_downlink_mbps: float = 10.0
    sigma: float = 1.0
    latency_s: float = 0.05
    seed: int = 0

    def __post_init__(self):
        for field_name in ("median_uplink_mbps", "median_downlink_mbps"):
            if not getattr(self, field_name) > 0:
                raise ValueError(f"{field_name} must be > 0")
        if self.sigma < 0 or self.latency_s < 0:
            raise ValueError("sigma and latency_s must be >= 0")

    def draw(self, num_clients: int) -> "ClientLinks":
        rng = np.random.default_rng(self.seed)
        up = self.median_uplink_mbps * np.exp(self.sigma * rng.standard_normal(num_clients))
        down = self.median_downlink_mbps * np.exp(self.sigma * rng.standard_normal(num_clients))
        return ClientLinks(uplink_bps=up * 1e6, downlink_bps=down * 1e6, latency_s=self.latency_s)

    def config(self) -> dict:
        return {"distribution": "log-normal", **asdict(self)}


@dataclass
class ClientLinks:
    """Drawn bandwidths, bits per second, one entry per client."""

    uplink_bps: np.ndarray
    downlink_bps: np.ndarray
    latency_s: float

    def transfer_time(self, client: int, uplink_bytes: int, downlink_bytes: int) -> tuple[float, float]:
        """(download seconds, upload seconds) for one client."""
        down = self.latency_s + 8.0 * downlink_bytes / float(self.downlink_bps[client])
        up = self.latency_s + 8.0 * uplink_bytes / float(self.uplink_bps[client])
        return down, up

    def budget_bytes(self, client: int, deadline_s: float) -> int:
        """Bytes a client can upload within ``deadline_s`` (for per-client budgets)."""
        return max(0, int((deadline_s - self.latency_s) * float(self.uplink_bps[client]) / 8.0))


def round_time(compute_s: Sequence[float], download_s: Sequence[float], upload_s: Sequence[float],
               deadline_s: float | None = None) -> float:
    """A synchronous round lasts as long as its slowest participant: download + compute + upload.

    With ``deadline_s``, the server closes the round at the deadline whatever is still in flight,
    so a round never lasts longer than that.
    """
    if not compute_s:
        return 0.0
    slowest = max(c + d + u for c, d, u in zip(compute_s, download_s, upload_s))
    return slowest if deadline_s is None else min(slowest, deadline_s)
