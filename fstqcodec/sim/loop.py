"""The reference federated loop: FedAvg over LoRA adapters with a compressed uplink.

One process simulates every client in turn on one model (the frozen base is shared; only the
adapter, which is what a client would hold, is swapped). Every method starts from the same
pretrained model and adapter initialisation, sees the same client sampling, the same local batches
and the same dropout masks, so differences between methods come from their encodings alone.

The client's side of a round (training, encoding, faults, delivery) is :mod:`fstqcodec.sim.client`;
this module is the server's: sample, broadcast, collect, decode, average, evaluate, book.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable, Sequence

import numpy as np

import fstqcodec
from fstqcodec.sim.bandwidth import LinkModel, round_time
from fstqcodec.sim.client import client_round, corrupt_in_transit, make_workbench, message_lost, seed_for
from fstqcodec.sim.config import TASK_TARGETS, SimConfig
from fstqcodec.sim.methods import Fstq, make_method
from fstqcodec.sim.partition import label_histogram
from fstqcodec.sim.server_optimizer import ServerOptimizer
from fstqcodec.sim.report import aggregate_seeds, summarize

__all__ = ["SimConfig", "TASK_TARGETS", "MethodRun", "run_simulation", "run_seeds", "corrupt_in_transit"]

#: ``on_round(method, round_number, accuracy, cumulative_uplink_bytes)``, called after every round.
RoundCallback = Callable[[str, int, float, int], None]


class MethodRun:
    """One method's FedAvg run: the global adapter, each client's state, and the books.

    Each client's state (its error-feedback memory) lives for the whole run: a client that is not
    sampled in a round keeps it untouched until it is sampled again.

    Parameters
    ----------
    bench : Workbench-like
        ``config``, ``layout``, ``initial_state``, ``client_sizes``, ``train(...)`` and ``evaluate(...)``
        (:class:`fstqcodec.sim.client.Workbench`).
    links : ClientLinks
        The clients' drawn bandwidths.
    method : Method
        The uplink encoding.
    initial_accuracy : float
        The initial adapter's accuracy (round 0), evaluated once per process.
    """

    def __init__(self, bench, links, method, initial_accuracy: float):
        self.bench, self.links, self.method, self.config = bench, links, method, bench.config
        self.downlink_codec = make_method("fp32", bench.layout, self.config.encode_config())
        self.proxy = _proxy_downlink(bench) if self.config.uses_proxies else None
        self.global_state = {name: array.copy() for name, array in bench.initial_state.items()}
        self.server_optimizer = ServerOptimizer(self.config.server_lr, self.config.server_momentum)
        self.client_states = [method.new_client_state() for _ in range(self.config.clients)]
        self.server_references: dict[int, dict] = {}  # predictive coding: the server's g_i per client
        # Token selection: each client's prior lives for the run, like its error-feedback memory.
        self.token_states = ([bench.new_token_state() for _ in range(self.config.clients)]
                             if self.config.token_keep is not None else [None] * self.config.clients)
        self.priors = _prior_exchange(bench) if self.config.token_prior == "federated" else None
        self.rounds = [{"round": 0, "accuracy": initial_accuracy, "uplink_bytes": 0,
                        "cumulative_uplink_bytes": 0, "downlink_bytes": 0, "sim_time_s": 0.0}]
        self.message_sizes: list[int] = []
        self.anatomy: dict[str, int] = {}  # bytes by part of the message, summed over messages
        self.dropped: list[dict] = []
        self.faults: list[dict] = []

    def participants(self, round_number: int) -> list[int]:
        """The clients sampled for a round: the same for every method, drawn from the run's seed."""
        config = self.config
        sampler = np.random.default_rng(seed_for(config.seed, 3, round_number))
        return [int(c) for c in np.sort(sampler.choice(config.clients, config.clients_per_round, replace=False))]

    def run(self, on_round: RoundCallback | None = None) -> dict:
        """Every round of the run; returns the method's record.

        Raises
        ------
        fstqcodec.EncodeError
            If a client's update cannot be encoded (see :func:`fstqcodec.sim.client.client_round`).
        """
        started = time.perf_counter()
        if on_round is not None:  # the method starts now (a progress bar's clock starts here)
            on_round(self.method.name, 0, self.rounds[0]["accuracy"], 0)
        for round_number in range(1, self.config.rounds + 1):
            entry = self.play_round(round_number)
            if on_round is not None:
                on_round(self.method.name, round_number, entry["accuracy"], entry["cumulative_uplink_bytes"])
        return self.record(time.perf_counter() - started)

    def play_round(self, round_number: int) -> dict:
        """Sample, broadcast, let each participant play its turn, average what arrived, evaluate."""
        participants = self.participants(round_number)
        # The federated token prior: the server's latest average goes down to each participant lacking it.
        prior_down = {client: self._prior_downlink(client) for client in participants}
        if self.proxy is not None:
            replies = [self._proxy_turn(client, round_number, prior_down[client]) for client in participants]
        else:
            downlink = self.downlink_codec.encode(self.global_state, fisher=None, state=None, seed=0)
            replies = [client_round(self.bench, self.method, self.client_states[client], self.links,
                                    self.global_state, len(downlink) + prior_down[client], round_number, client,
                                    tokens=self.token_states[client])
                       for client in participants]
        sent = [reply for reply in replies if reply.fault != "dropout"]
        for reply in replies:
            self._book(reply, round_number)
        proxy_figures = self._aggregate(replies, round_number)
        prior_figures = self._collect_priors(sent, round_number, sum(prior_down.values()))
        duration = round_time([r.compute_s for r in sent], [r.download_s for r in sent],
                              [r.upload_s for r in sent], self.config.round_deadline_s)
        previous = self.rounds[-1]
        uplink = sum(len(r.sent) + len(r.prior_sent) for r in sent)
        entry = {
            "round": round_number,
            "accuracy": self.bench.evaluate(self.global_state),
            "uplink_bytes": uplink,
            "cumulative_uplink_bytes": previous["cumulative_uplink_bytes"] + uplink,
            "downlink_bytes": (len(downlink) * len(participants) if self.proxy is None
                               else proxy_figures["proxy_downlink_bytes"]) + sum(prior_down.values()),
            "sim_time_s": previous["sim_time_s"] + duration,
            # Where the round's time went (the slowest client's parts are not broken out).
            "round_time_s": duration,
            "max_compute_s": max((r.compute_s for r in sent), default=0.0),
            "max_upload_s": max((r.upload_s for r in sent), default=0.0),
            # e.g. ROUGE-L and exact match of a generative task; a Workbench-like stand-in may have none
            **getattr(self.bench, "round_metrics", dict)(),
            **proxy_figures,
            **prior_figures,
        }
        if self.config.token_keep is not None:  # only then: a run without token selection records as before
            from fstqcodec.sim.token_selection import round_compute

            entry.update(round_compute(sent))
        self.rounds.append(entry)
        return entry

    def _proxy_turn(self, client: int, round_number: int, prior_bytes: int = 0):
        """A client's turn from its decoded proxy (:mod:`fstqcodec.sim.downlink`)."""
        received, visible = self.proxy.receive(self.global_state, client, round_number)
        return client_round(self.bench, self.method, self.client_states[client], self.links, received,
                            self.proxy.last_bytes + prior_bytes, round_number, client, visible=visible,
                            on_trained=self.proxy.keep_local, tokens=self.token_states[client])

    def _prior_downlink(self, client: int) -> int:
        """Bytes of the averaged token prior sent to ``client`` this round (0 without the federated prior)."""
        return 0 if self.priors is None else self.priors.send_down(self.token_states[client])

    def _collect_priors(self, sent, round_number: int, downlink_bytes: int) -> dict:
        """The server averages the token priors that arrived; the round's prior figures ({} without)."""
        if self.priors is None:
            return {}
        figures, dropped = self.priors.collect(sent, round_number)
        self.dropped.extend(dropped)
        return {**figures, "prior_downlink_bytes": downlink_bytes}

    def _book(self, reply, round_number: int) -> None:
        """Count what a client sent and log what went wrong on the way."""
        if reply.fault is not None:
            entry = {"round": round_number, "client": reply.client, "fault": reply.fault}
            if reply.fault == "straggler":
                entry["finish_s"] = round(reply.finish_s, 3)
            self.faults.append(entry)
        if reply.fault == "dropout":
            return
        self.message_sizes.append(len(reply.sent))
        for part, size in self.method.anatomy(reply.sent).items():
            self.anatomy[part] = self.anatomy.get(part, 0) + size

    def _aggregate(self, replies, round_number: int) -> dict:
        """FedAvg of the decoded updates, weighted by the clients' examples, into the global adapter.

        Each message is decoded and added into one running sum as it is read
        (:class:`fstqcodec.StreamingAggregator`, as a server with thousands of clients would): an
        fstq message is checked against the layout before its codes are decoded, a baseline's
        decoded arrays by names, shapes and finite values. A message that is refused is dropped
        and recorded, and the rejection reaches the client (its error feedback keeps the update);
        the round goes on with the others. With downlink proxies the average is masked
        (:meth:`_aggregate_masked`). Returns the round's proxy figures (empty without proxies).
        """
        if self.proxy is not None:
            return self._aggregate_masked(replies, round_number)
        layout = self.bench.layout
        aggregator = fstqcodec.StreamingAggregator(
            {n: (layout.shapes[n], "float32") for n in layout.names},
            schemas=getattr(self.method, "wire_schema", None),
        )
        for reply in replies:
            if reply.received is None:
                continue
            error = self._add(aggregator, reply)
            if error is not None:
                self.dropped.append({"round": round_number, "client": reply.client, "error": error})
                message_lost(self.client_states[reply.client])
        mean = aggregator.result() if aggregator.accepted else {}
        self.global_state = self.server_optimizer.step(self.global_state, mean)
        return {}

    def _aggregate_masked(self, replies, round_number: int) -> dict:
        """Masked FedAvg of the proxies' round: each entry over the clients that saw it."""
        layout = self.bench.layout
        for reply in replies:
            if reply.received is None:
                continue
            try:
                decoded = self.method.decode(reply.received)
                layout.check(decoded)
            except ValueError as error:  # fstqcodec.DecodeError is a ValueError too
                self.dropped.append({"round": round_number, "client": reply.client, "error": repr(error)})
                message_lost(self.client_states[reply.client])
                continue
            self.proxy.add(decoded, reply.visible, reply.weight)
        averaged, figures = self.proxy.finish_round(self.global_state)
        if self.server_optimizer.is_fedavg:
            self.global_state = averaged
        else:
            mean = {name: averaged[name] - self.global_state[name] for name in averaged}
            self.global_state = self.server_optimizer.step(self.global_state, mean)
        return figures

    def _add(self, aggregator, reply) -> str | None:
        """Add one reply's update into the round's sum; why it was refused (as the error's repr), or None."""
        if self.method.keeps_server_references:
            return self._add_reference(aggregator, reply)
        if isinstance(self.method, Fstq):
            added = aggregator.add(reply.received, reply.weight, client=reply.client)
        else:
            try:
                decoded = self.method.decode(reply.received)
            except ValueError as error:  # the baselines' container errors
                return repr(error)
            added = aggregator.add_arrays(decoded, reply.weight, client=reply.client)
        if added:
            return None
        rejection = aggregator.rejections[-1]
        return f"{rejection.reason}({rejection.detail!r})"

    def _add_reference(self, aggregator, reply) -> str | None:
        """Predictive coding: move the client's reference by its message and add the reference."""
        try:
            decoded = self.method.decode(reply.received)
            self.bench.layout.check(decoded)
        except ValueError as error:  # fstqcodec.DecodeError is a ValueError too
            return repr(error)
        previous = self.server_references.get(reply.client, {})
        reference = self.method.server_update(previous, decoded)
        if not aggregator.add_arrays(reference, reply.weight, client=reply.client):
            rejection = aggregator.rejections[-1]
            return f"{rejection.reason}({rejection.detail!r})"
        self.server_references[reply.client] = reference
        return None

    def record(self, wall_time_s: float) -> dict:
        """The method's entry in ``results.json`` (its summary is added by the report)."""
        sizes = self.message_sizes
        mean_bytes = float(np.mean(sizes)) if sizes else 0.0
        return {
            "config": self.method.config(),
            "rounds": self.rounds,
            "wall_time_s": wall_time_s,
            "mean_message_bytes": mean_bytes,
            "mean_bits_per_param": 8.0 * mean_bytes / self.bench.layout.total,
            # Mean bytes per message by part (header, scales, codes, ...): what the side costs.
            "message_anatomy": {part: total / max(1, len(sizes)) for part, total in self.anatomy.items()},
            "dropped_messages": self.dropped,
            "faults": self.faults,
        }


def _prior_exchange(bench):
    """The server's side of the federated token prior, for the workbench's model and clients."""
    from fstqcodec.sim.prior_exchange import PriorExchange

    return PriorExchange(bench.config, bench.model.config, bench.client_sizes)


def _proxy_downlink(bench):
    """The run's proxy downlink, from the config's mask rates and the shared initial adapter."""
    from fstqcodec.sim.downlink import ProxyDownlink

    config = bench.config
    return ProxyDownlink(bench.layout.shapes, bench.initial_state, server_mask=config.server_mask,
                         client_mask=config.client_mask, bits_per_param=config.downlink_bpp,
                         fill=config.proxy_fill, seed=seed_for(config.seed, 7), block_size=config.block_size,
                         server_exempt=config.server_exempt_patterns)


class _Federation:
    """What a process shares between methods: the workbench (data, model) and the links."""

    def __init__(self, config: SimConfig):
        self.config = config
        self.bench = make_workbench(config)
        self.link_model = LinkModel(config.median_uplink_mbps, config.median_downlink_mbps,
                                    config.bandwidth_sigma, config.latency_s, seed=seed_for(config.seed, 2))
        self.links = self.link_model.draw(config.clients)
        self.initial_accuracy: float | None = None
        self.initial_metrics: dict = {}

    def run_method(self, name: str, on_round: RoundCallback | None = None) -> dict:
        """FedAvg for ``config.rounds`` rounds with uplink method ``name``; returns its record."""
        if self.initial_accuracy is None:
            self.initial_accuracy = self.bench.evaluate(self.bench.initial_state)
            self.initial_metrics = self.bench.round_metrics()
        method = make_method(name, self.bench.layout, self.config.encode_config())
        run = MethodRun(self.bench, self.links, method, self.initial_accuracy)
        run.rounds[0].update(self.initial_metrics)
        return run.run(on_round)

    def describe(self) -> dict:
        """Facts about the run's data, model and links for the results' ``config``."""
        import torch

        bench, config, links = self.bench, self.config, self.links
        task = bench.task
        selection = {}
        if config.token_keep is not None:
            from fstqcodec.sim.token_selection import describe

            selection = {"token_selection": describe(config)}
            if config.token_prior == "federated":
                from fstqcodec.sim import prior_exchange

                selection["token_selection"]["prior"] = prior_exchange.describe(config)
        return {
            "lora_alpha": config.lora_alpha,
            "trainable_parameters": bench.layout.total,
            "trainable_tensors": len(bench.layout.names),
            "num_labels": task.num_labels,
            "label_names": task.label_names,
            "data_source": task.source,
            "task_notes": task.notes,
            "train_examples": int(bench.train_idx.size),
            "test_examples": int(bench.test_idx.size),
            "eval_examples": int(bench.eval_idx.size),
            "client_examples": [int(n) for n in bench.client_sizes],
            "client_label_histogram": label_histogram(task.labels[bench.train_idx], bench.partition, task.num_labels),
            "clients_per_round": config.clients_per_round,
            "fedavg_weighting": "client example count",
            "server_optimizer": (f"FedAvgM: server lr {config.server_lr}, momentum {config.server_momentum}"
                                 if config.server_momentum else f"FedAvg, server lr {config.server_lr}"),
            "local_optimizer": "AdamW (fresh each round), weight_decay=0",
            "downlink": ("fp32 global adapter (lossless), same for every method" if not self.config.uses_proxies else
                         f"fstq proxies (fstqcodec.proxy): server mask {self.config.server_mask}"
                         f"{' except ' + self.config.server_mask_exempt if self.config.server_mask_exempt else ''}, client mask "
                         f"{self.config.client_mask}, {self.config.downlink_bpp} bits per entry sent, hidden entries "
                         f"{self.config.proxy_fill}; masked FedAvg"),
            "bandwidth_model": {
                **self.link_model.config(),
                "uplink_mbps": [round(float(b) / 1e6, 4) for b in links.uplink_bps],
                "downlink_mbps": [round(float(b) / 1e6, 4) for b in links.downlink_bps],
                "round_time": ("max over participants of (download + measured compute + upload)"
                               + ("" if config.round_deadline_s is None else
                                  f", at most the round deadline of {config.round_deadline_s} s; later replies discarded")),
                "compute_time": ("measured wall time of local training and encoding on this machine"
                                 if config.step_time_s is None else
                                 f"local_steps x {config.step_time_s} s (modelled) + measured encoding"),
            },
            "platform": {"python": platform.python_version(), "torch": torch.__version__,
                         "machine": platform.machine(), "cpu_count": os.cpu_count()},
            **bench.describe(),
            **selection,
        }


# Worker processes (spawned: torch and fork do not mix) each build their own _Federation once.
_WORKER_FEDERATION: _Federation | None = None
_WORKER_QUEUE = None


def _exit_with_parent(parent_pid: int) -> None:
    """Stop this worker when the parent dies (killed runs must not leave workers burning CPU)."""
    while True:
        time.sleep(2.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def _worker_init(config: SimConfig, queue) -> None:
    global _WORKER_FEDERATION, _WORKER_QUEUE
    import threading

    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    _WORKER_FEDERATION = _Federation(config)
    _WORKER_QUEUE = queue


def _worker_run(name: str) -> tuple[str, dict, dict]:
    federation = _WORKER_FEDERATION
    assert federation is not None

    def report(*event) -> None:
        _WORKER_QUEUE.put(event)

    return name, federation.run_method(name, report), federation.describe()


def _run_in_process(config: SimConfig, on_round: RoundCallback) -> tuple[dict, dict]:
    federation = _Federation(config)
    methods = {name: federation.run_method(name, on_round) for name in config.methods}
    description = federation.describe()
    federation.bench.close()
    return methods, description


def _run_in_workers(config: SimConfig, workers: int, on_round: RoundCallback) -> tuple[dict, dict]:
    """Each method in one of ``workers`` spawned processes; progress comes back through a queue."""
    import multiprocessing
    import queue as queue_module
    from concurrent.futures import ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")
    # A plain queue handed to the workers at start-up (no manager process to outlive the run).
    updates = context.Queue()
    methods, description = {}, {}
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                             initargs=(config, updates)) as pool:
        pending = {pool.submit(_worker_run, name) for name in config.methods}
        while pending:
            done, pending = wait(pending, timeout=0.5)
            while True:
                try:
                    on_round(*updates.get_nowait())
                except queue_module.Empty:
                    break
            for future in done:
                name, methods[name], description = future.result()
    # Report methods in the order asked for, not the order they finished.
    return {name: methods[name] for name in config.methods}, description


def _choose_target(config: SimConfig, runs: list[dict]) -> tuple[float, str]:
    """The target accuracy of the 'to target' figures, and the rule that chose it.

    ``runs`` holds each seed's ``methods``; a relative target takes fp32's mean final accuracy.
    """
    if config.target_accuracy is not None:
        return config.target_accuracy, "given"
    if config.target_of_fp32 is None and config.task in TASK_TARGETS:
        return TASK_TARGETS[config.task], f"task default for {config.task!r}"
    fraction = 0.95 if config.target_of_fp32 is None else config.target_of_fp32
    finals = [(methods.get("fp32") or next(iter(methods.values())))["rounds"][-1]["accuracy"] for methods in runs]
    over = " (mean over the seeds)" if len(runs) > 1 else ""
    # round(): 100 x 0.95 is 95.0 exactly, so a fraction of 0.95 floors as 95 x accuracy always did.
    return (math.floor(round(100 * fraction, 6) * sum(finals) / len(finals)) / 100,
            f"{fraction:g} x final accuracy of fp32 (or the first method){over}, floored to 0.01")


def _ignore_round(method: str, round_number: int, accuracy: float, uplink: int) -> None:
    pass


class _ProgressBars:
    """One tqdm bar per method, opened when the method starts (round 0), so each ETA is its own.

    A bar counts its method's rounds from the moment its first round begins: model loading and
    methods still waiting for a worker do not inflate the rate, as one bar over every method's
    rounds did (it showed hours at the start of a ten-minute run).
    """

    def __init__(self, config: SimConfig, label: str = ""):
        from tqdm.auto import tqdm

        self._tqdm, self.config, self.label, self.bars = tqdm, config, label, {}

    def update(self, method: str, round_number: int, accuracy: float, uplink: int) -> None:
        bar = self.bars.get(method)
        if bar is None:
            position = list(self.config.methods).index(method)
            bar = self.bars[method] = self._tqdm(
                total=self.config.rounds, desc=f"{self.label}{method}", unit="round", position=position,
                leave=True, dynamic_ncols=True, smoothing=0.1)
        bar.set_postfix(acc=f"{accuracy:.3f}", up=f"{uplink / 1e6:.2f}MB", refresh=False)
        bar.update(round_number - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def run_simulation(config: SimConfig, *, progress: bool = True, workers: int | None = None,
                   label: str = "") -> dict:
    """Run every method in ``config.methods`` and return the results record.

    Parameters
    ----------
    config : SimConfig
    progress : bool
        Show a tqdm progress bar per method (its rounds, accuracy and uplink so far, and an ETA).
    workers : int, optional
        Methods run in this many processes at once, each with ``max(1, threads // workers)`` torch
        threads (small LoRA batches use one thread far better than two, so parallel single-threaded
        processes finish sooner). Default: ``min(len(methods), 2 * threads)``; 1 runs in this process.
    label : str
        Put before each progress bar's method name (e.g. the seed of a multi-seed run).

    Returns
    -------
    dict
        ``{"config", "target_accuracy", "methods": {name: {"rounds": [...], "summary": {...}}}, ...}``;
        see :mod:`fstqcodec.sim.report`.

    Raises
    ------
    ValueError
        On an invalid configuration.
    RuntimeError
        If a task or model package is missing.
    """
    config.validate()
    started = time.perf_counter()
    threads = config.threads or max(1, os.cpu_count() or 1)
    # One single-threaded process per method, up to twice the threads: small LoRA batches scale
    # poorly across threads, and a method left alone on one thread would leave the other core idle.
    workers = max(1, min(workers or min(len(config.methods), 2 * threads), len(config.methods)))
    bars = _ProgressBars(config, label) if progress else None
    on_round = bars.update if bars is not None else _ignore_round
    try:
        if workers == 1:
            methods, description = _run_in_process(config.replace(threads=threads), on_round)
        else:
            methods, description = _run_in_workers(config.replace(threads=max(1, threads // workers)), workers,
                                                   on_round)
    finally:
        if bars is not None:
            bars.close()
    target, target_rule = _choose_target(config, [methods])
    results = {
        "config": {**config.record(), "threads": threads, "workers": workers, **description},
        "target_accuracy": target,
        "target_rule": target_rule,
        "methods": methods,
        "wall_time_s": time.perf_counter() - started,
    }
    summarize(results)
    return results


def run_seeds(config: SimConfig, seeds: Sequence[int], *, progress: bool = True,
              workers: int | None = None) -> tuple[dict, list[dict]]:
    """Run ``config`` once per seed and aggregate: mean and spread of every figure.

    A seed changes everything it drives: the train/test split, the partition, the initialisation,
    the client sampling, the batches and dropout masks, the faults and the links. Every seed's run
    is summarised against one target (the given one, the task's, or ``target_of_fp32`` x fp32's
    final accuracy averaged over the seeds).

    Parameters
    ----------
    config : SimConfig
        Its ``seed`` is ignored.
    seeds : sequence of int
        Distinct seeds, at least one.
    progress, workers
        As for :func:`run_simulation`, for each seed in turn.

    Returns
    -------
    (dict, list of dict)
        The aggregated record (:func:`fstqcodec.sim.report.aggregate_seeds`) and each seed's own.

    Raises
    ------
    ValueError
        On an invalid configuration, or no or repeated seeds.
    RuntimeError
        If a task or model package is missing.
    """
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or any(seed < 0 for seed in seeds):
        raise ValueError(f"seeds must be distinct integers >= 0, at least one; got {seeds}")
    for seed in seeds:
        config.replace(seed=seed).validate()
    runs = [run_simulation(config.replace(seed=seed), progress=progress, workers=workers,
                           label=f"seed {seed} " if len(seeds) > 1 else "")
            for seed in seeds]
    target, rule = _choose_target(config, [run["methods"] for run in runs])
    for run in runs:
        run["target_accuracy"], run["target_rule"] = target, rule
        summarize(run)
    return aggregate_seeds(runs), runs
