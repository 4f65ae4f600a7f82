"""Per-client uplink budgets: each node's uplink bandwidth times the round deadline.

With ``deadline-s > 0`` in the run config, the ServerApp asks every node for its uplink bandwidth
in a ``query`` message before round 1 and gives each the budget its link carries before the
deadline (:class:`fstqcodec.flower.LinkBudget`), as ``fstq simulate --deadline-s`` does: the
deadline less the link latency, times the bandwidth, never below ``min-budget-bytes``. A node
started with ``--node-config "uplink-mbps=<x>"`` reports that bandwidth (a real device's link);
otherwise its bandwidth is the one the in-process loop draws for client ``partition-id`` (the
same log-normal link model, parameters and seed).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Message, MessageType, MetricRecord, RecordDict

from fstqcodec.flower import LinkBudget
from fstqcodec.sim.bandwidth import LinkModel
from fstqcodec.sim.client import seed_for  # the in-process loop's seed derivation

__all__ = ["node_uplink_bps", "answer_link_query", "link_budget", "ask_for_links"]

#: Record and key of a node's answer: its uplink bandwidth in bits per second.
LINK_RECORD, UPLINK_KEY = "link", "uplink-bps"


def node_uplink_bps(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> float:
    """The uplink bandwidth of this node, bits per second.

    Raises
    ------
    ValueError
        If ``uplink-mbps`` is given and not positive.
    """
    if "uplink-mbps" in node_config:
        mbps = float(node_config["uplink-mbps"])
        if not mbps > 0:
            raise ValueError(f"uplink-mbps must be positive, got {mbps!r}")
        return mbps * 1e6
    model = LinkModel(median_uplink_mbps=float(run_config["median-uplink-mbps"]),
                      sigma=float(run_config["bandwidth-sigma"]),
                      latency_s=float(run_config["latency-s"]),
                      seed=seed_for(int(run_config["seed"]), 2))
    links = model.draw(int(node_config["num-partitions"]))
    return float(links.uplink_bps[int(node_config["partition-id"])])


def answer_link_query(msg: Message, node_config: Mapping, run_config: Mapping) -> Message:
    """The node's reply to the server's link query."""
    bandwidth = node_uplink_bps(node_config, run_config)
    return Message(RecordDict({LINK_RECORD: MetricRecord({UPLINK_KEY: bandwidth})}), reply_to=msg)


def link_budget(replies: Iterable[Message], run_config: Mapping[str, Any]) -> LinkBudget:
    """The per-node budget from the nodes' answers (bandwidth x (deadline - latency)).

    Raises
    ------
    RuntimeError
        If a node answered with an error.
    ValueError
        If the deadline does not exceed the latency.
    """
    bandwidths = {}
    for reply in replies:
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} did not report its link: "
                               f"{reply.error.reason}")
        bandwidths[reply.metadata.src_node_id] = float(reply.content[LINK_RECORD][UPLINK_KEY])
    deadline, latency = float(run_config["deadline-s"]), float(run_config["latency-s"])
    if not deadline > latency:
        raise ValueError(f"deadline-s ({deadline}) must exceed latency-s ({latency})")
    return LinkBudget(bandwidths, deadline_s=deadline - latency,
                      min_bytes=int(run_config["min-budget-bytes"]))


def ask_for_links(grid, run_config: Mapping[str, Any], clients: int, timeout_s: float = 600.0):
    """Wait for ``clients`` nodes, ask each for its link; the :class:`LinkBudget` of their answers.

    Raises
    ------
    RuntimeError
        If fewer than ``clients`` nodes connect, or answer, within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < clients and time.monotonic() < deadline:
        time.sleep(1.0)
        node_ids = list(grid.get_node_ids())
    if len(node_ids) < clients:
        raise RuntimeError(f"only {len(node_ids)} of {clients} nodes connected in {timeout_s:.0f} s")
    queries = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
               for node in node_ids]
    replies = list(grid.send_and_receive(queries, timeout=max(1.0, deadline - time.monotonic())))
    if len(replies) < len(node_ids):
        raise RuntimeError(f"only {len(replies)} of {len(node_ids)} nodes reported their link")
    return link_budget(replies, run_config)
