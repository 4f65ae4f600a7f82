"""ServerApp: FedAvg over the LoRA adapter, wrapped by FstqStrategy; writes ``results.json``.

The wrapped ``FedAvg`` is Flower's own, unchanged: :class:`fstqcodec.flower.FstqStrategy` asks
each client for an fstq message under the budget, decodes and validates the replies, and hands
FedAvg plain arrays. With ``server-mask`` or ``client-mask`` above 0 no client is sent the
global adapter: each gets its own proxy (:class:`fstqcodec.flower.DownlinkProxies`) and the
round is masked FedAvg. The global model is evaluated on the server after every round, on the same
held-out subset as ``fstq simulate``, and the run is recorded in the same ``results.json`` format.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from logging import INFO

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

import fstqcodec
from fstqcodec.flower import DownlinkProxies, FstqStrategy
from fstqcodec.sim.client import seed_for
from fstq_flower_app.links import ask_for_links
from fstq_flower_app.task import config_from_run_config, workbench

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation and write the per-round record."""
    config = context.run_config
    clients = int(config["clients"])
    settings = config_from_run_config(config)
    bench = workbench(settings)
    downlink = {"none": None, "lossless": "lossless"}[str(config["downlink"])]
    if settings.uses_proxies:
        if downlink is not None:
            raise ValueError("downlink proxies replace the downlink: set downlink = \"none\" with server-mask/client-mask")
        # The in-process loop's mask seed (fstqcodec.sim.loop); Flower's node ids stand for its clients.
        downlink = DownlinkProxies(server_mask=settings.server_mask, client_mask=settings.client_mask,
                                   fill=settings.proxy_fill, budget=fstqcodec.Budget(bits_per_param=settings.downlink_bpp),
                                   seed=seed_for(settings.seed, 7), server_exempt=settings.server_exempt_patterns)
    # deadline-s > 0: each node's own budget, its uplink x the deadline; else budget-bpp for all.
    per_node = ask_for_links(grid, config, clients) if float(config["deadline-s"]) > 0 else None
    encoder = fstqcodec.EncodeConfig(
        budget=None if per_node else fstqcodec.Budget(bits_per_param=float(config["budget-bpp"])),
        block_size=int(config["block-size"]),
        fisher_power=float(config["fisher-power"]),
        seed=settings.seed,
    )
    strategy = FstqStrategy(
        FedAvg(
            fraction_train=float(config["fraction-train"]),
            fraction_evaluate=0.0,  # evaluation is central, as in the in-process loop
            min_train_nodes=max(1, round(float(config["fraction-train"]) * clients)),
            min_available_nodes=clients,
        ),
        encoder,
        budget=per_node,
        downlink=downlink,
    )

    accuracy: dict[int, float] = {}
    metrics: dict[int, dict] = {}  # a generative task's ROUGE-L and exact match, per round
    finished_at: dict[int, float] = {}
    started = time.perf_counter()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        accuracy[server_round] = bench.evaluate({name: a.numpy() for name, a in arrays.items()})
        metrics[server_round] = bench.round_metrics()
        finished_at[server_round] = time.perf_counter() - started
        # Flower's log shows them too ("rouge-l", "exact-match" for a QA task).
        extra = {key.replace("_", "-"): float(value) for key, value in metrics[server_round].items()}
        return MetricRecord({"accuracy": accuracy[server_round], **extra})

    initial = ArrayRecord({name: Array(value) for name, value in bench.adapter().items()})
    strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=int(config["num-server-rounds"]),
        train_config=ConfigRecord(),
        evaluate_fn=evaluate,
    )
    # The ServerApp runs in a process whose working directory Flower chooses, so a relative
    # out-dir is taken relative to the home directory rather than to an unknown place.
    out_dir = pathlib.Path.home() / pathlib.Path(str(config["out-dir"])).expanduser()
    write_results(out_dir, config, settings, strategy, accuracy, finished_at, parameters=bench.layout.total,
                  metrics=metrics, description=bench.describe())
    log(INFO, "fstq-flower-app: wrote %s", out_dir / "results.json")


def _proxy_figures(strategy, server_round: int) -> dict:
    """The loop's per-round proxy figures (``fstq simulate --server-mask``), where proxies ran."""
    figures = strategy.proxy_figures.get(server_round)
    if not figures:
        return {}
    return {
        "proxy_downlink_bytes": strategy.traffic[server_round].downlink_bytes,
        "proxy_cosine_mean": figures.get("proxy-cosine-mean"),
        "proxy_cosine_max": figures.get("proxy-cosine-max"),
        "fraction_ever_seen": figures.get("proxy-seen-fraction"),
    }


def _target(settings) -> tuple[float, str]:
    """The target accuracy of the record's "to target" figures, and the rule that chose it.

    The in-process loop takes 95% of fp32's final accuracy where a task has no default; this
    engine runs fstq alone, so without ``target`` (``--target``) such a task gets 0.0, which round
    0 already reaches: its "to target" figures then say nothing.
    """
    from fstqcodec.sim.loop import TASK_TARGETS

    if settings.target_accuracy is not None:
        return settings.target_accuracy, "given"
    if settings.task in TASK_TARGETS:
        return TASK_TARGETS[settings.task], f"task default for {settings.task!r}"
    return 0.0, f"none: no default for {settings.task!r} and no fp32 run on this engine (pass --target)"


def write_results(out_dir, config, settings, strategy, accuracy, finished_at, *, parameters: int,
                  metrics=None, description=None) -> None:
    """Write ``results.json`` (and the CSV and summary table) as ``fstq simulate`` does.

    One method, ``fstq``, in the layout of :mod:`fstqcodec.sim.report`, so the same tools read
    both engines' records. Two definitions differ and are recorded in ``config``: ``uplink_bytes``
    is Flower's ``ArrayRecord.count_bytes()`` of the replies (the message plus its 4-byte array
    name), and ``sim_time_s`` is the wall-clock measured on the Flower engine, not a link model.
    ``parameters`` is the adapter's size; ``metrics`` (per round) and ``description`` are the
    workbench's ``round_metrics()`` and ``describe()``: for a generative QA task, each round's
    ``rouge_l`` and ``exact_match`` and the config's ``quality_metric`` (ROUGE-L, which
    ``accuracy`` holds), as the in-process record has them.
    """
    from fstqcodec.sim.report import summarize, validate_results, write_outputs

    metrics = metrics or {}
    rounds = [{"round": 0, "accuracy": accuracy[0], "uplink_bytes": 0, "cumulative_uplink_bytes": 0,
               "downlink_bytes": 0, "sim_time_s": 0.0, **metrics.get(0, {})}]
    cumulative = 0
    replies = 0
    for server_round in sorted(r for r in accuracy if r > 0):
        traffic = strategy.traffic[server_round]
        cumulative += traffic.uplink_bytes
        replies += traffic.replies_accepted + len(traffic.dropped)
        rounds.append({
            "round": server_round,
            "accuracy": accuracy[server_round],
            "uplink_bytes": traffic.uplink_bytes,
            "cumulative_uplink_bytes": cumulative,
            "downlink_bytes": traffic.downlink_bytes,
            "sim_time_s": finished_at[server_round],
            "replies_accepted": traffic.replies_accepted,
            "dropped_replies": [drop.reason for drop in traffic.dropped],
            **metrics.get(server_round, {}),
            **_proxy_figures(strategy, server_round),
        })
    target, rule = _target(settings)
    mean_message = cumulative / replies if replies else 0.0
    record = {
        "engine": "flower",
        "config": {
            **{key.replace("-", "_"): config[key] for key in config},
            **dataclasses.asdict(settings),
            "clients": settings.clients,
            "rounds": int(config["num-server-rounds"]),
            **(description or {}),  # after the settings: a QA task's own target_modules win
            "trainable_parameters": parameters,
            "uplink_bytes_rule": "Flower's ArrayRecord.count_bytes() of every train reply",
            "sim_time_rule": "measured wall-clock on the Flower engine, not a bandwidth model",
        },
        "target_accuracy": target,
        "target_rule": rule,
        "methods": {"fstq": {
            "rounds": rounds,
            "mean_message_bytes": mean_message,
            "mean_bits_per_param": 8.0 * mean_message / parameters if parameters else 0.0,
        }},
    }
    summarize(record)
    validate_results(record)
    write_outputs(record, out_dir, plots=False)
