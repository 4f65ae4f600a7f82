"""An NVIDIA FLARE job whose task results travel as fstq messages, run in NVFLARE's simulator.

A small LoRA-shaped model in numpy (rank-16 A and B matrices of a 1024-wide model, 8 pairs:
262,144 parameters, 1 MiB in float32) is trained by ScatterAndGather (FedAvg) with NVFLARE's own
InTimeAccumulateWeightedAggregator. Each site's "training" moves the model a step towards its own
target and reports the step (WEIGHT_DIFF, or WEIGHTS with ``--weights``) with its number of
examples and a Fisher estimate; fstqcodec's filters compress it on the client and decode it on the
server. ``--hostile-sites`` adds sites whose result is replaced, after compression, by garbage,
truncated bytes or a message of another model (one kind per round): the server drops them with
the reason and the rounds complete.

Run (CPU, offline; from the repository root):
    python integrations/nvflare-job/fstq_job.py --workspace runs/nvflare-job --rounds 3 --clients 2 --hostile-sites 1
"""

from __future__ import annotations

import argparse
import json
import os
import zlib

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.executor import Executor
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import make_reply
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.abstract.model_persistor import ModelPersistor
from nvflare.app_common.aggregators.intime_accumulate_model_aggregator import InTimeAccumulateWeightedAggregator
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.shareablegenerators.full_model_shareable_generator import FullModelShareableGenerator
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather
from nvflare.fuel.utils import fobs

import fstqcodec
from fstqcodec.nvflare import FISHER_META_KEY, PAYLOAD_KEY, FstqModelReceiver, FstqModelSender, FstqUpdateDecoder, FstqUpdateEncoder

RANK, WIDTH, PAIRS = 16, 1024, 8
HOSTILE_KINDS = ("garbage", "truncated", "other-model")


def initial_model() -> dict:
    """LoRA's initialisation: A random, B zero (so the adapter starts as the identity)."""
    rng = np.random.default_rng(0)
    model = {}
    for layer in range(PAIRS):
        model[f"layers.{layer}.q_proj.lora_A"] = (rng.standard_normal((RANK, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        model[f"layers.{layer}.q_proj.lora_B"] = np.zeros((WIDTH, RANK), np.float32)
    return model


def site_seed(site: str) -> int:
    return zlib.crc32(site.encode())


class LoraToyTrainer(Executor):
    """Moves the received model a step towards the site's target; reports the step and its Fisher."""

    def __init__(self, learning_rate: float = 0.2, send_weights: bool = False):
        super().__init__()
        self.learning_rate = learning_rate
        self.send_weights = send_weights

    def execute(self, task_name, shareable, fl_ctx, abort_signal):
        if task_name != AppConstants.TASK_TRAIN:
            return make_reply(ReturnCode.TASK_UNKNOWN)
        received = from_shareable(shareable).data
        site = fl_ctx.get_identity_name()
        rng = np.random.default_rng(site_seed(site))
        step, fisher = {}, {}
        for name, weights in received.items():
            target = (rng.standard_normal(weights.shape) * 0.05).astype(np.float32)
            gradient = weights - target
            step[name] = (-self.learning_rate * gradient).astype(np.float32)
            # The squared gradient plus a little noise: an empirical-Fisher-like importance.
            fisher[name] = (gradient**2 + 1e-8).astype(np.float32)
        examples = 10 + site_seed(site) % 40  # the aggregation weight
        if self.send_weights:
            data, kind = {name: received[name] + step[name] for name in step}, DataKind.WEIGHTS
        else:
            data, kind = step, DataKind.WEIGHT_DIFF
        meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: examples, FISHER_META_KEY: fisher}
        return DXO(kind, data=data, meta=meta).to_shareable()


class RecordingPersistor(ModelPersistor):
    """Starts from :func:`initial_model`; saves every round's global model to ``record_dir``."""

    def __init__(self, record_dir: str):
        super().__init__()
        self.record_dir = record_dir

    def load_model(self, fl_ctx):
        model = initial_model()
        os.makedirs(self.record_dir, exist_ok=True)
        np.savez(os.path.join(self.record_dir, "global-initial.npz"), **model)
        return make_model_learnable(model, {})

    def save_model(self, model, fl_ctx):
        round_number = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        np.savez(os.path.join(self.record_dir, f"global-round{round_number}.npz"), **model["weights"])


class HostileReplies(Filter):
    """A misbehaving client: replaces its compressed result by another kind of bad reply each round."""

    def __init__(self):
        super().__init__()
        self._results = 0  # the round's cookie is attached after the result filters run

    def process(self, shareable, fl_ctx):
        dxo = from_shareable(shareable)
        round_number = self._results
        self._results += 1
        kind = HOSTILE_KINDS[round_number % len(HOSTILE_KINDS)]
        message = dxo.data[PAYLOAD_KEY].tobytes()
        if kind == "garbage":
            message = np.random.default_rng(round_number).bytes(len(message))
        elif kind == "truncated":
            message = message[: len(message) // 2]
        else:
            other = {name.replace("q_proj", "v_proj"): array for name, array in initial_model().items()}
            message = fstqcodec.encode(other, budget=fstqcodec.Budget(bits_per_param=1))
        dxo.data[PAYLOAD_KEY] = np.frombuffer(message, dtype=np.uint8)
        self.log_info(fl_ctx, f"hostile site sends {kind} ({len(message)} bytes)")
        return dxo.update_shareable(shareable)


class SizeRecorder(Filter):
    """Writes the serialized size of each task result (what crosses the network) to ``record_dir``."""

    def __init__(self, record_dir: str, label: str):
        super().__init__()
        self.record_dir = record_dir
        self.label = label
        self._results = 0

    def process(self, shareable, fl_ctx):
        dxo = from_shareable(shareable)
        if FISHER_META_KEY in dxo.meta:
            # The plain result a client would send: the Fisher is the encoder's input, not cargo.
            meta = {key: value for key, value in dxo.meta.items() if key != FISHER_META_KEY}
            size = len(fobs.dumps(DXO(dxo.data_kind, dxo.data, meta).to_shareable()))
        else:
            size = len(fobs.dumps(shareable))
        round_number = self._results
        self._results += 1
        os.makedirs(self.record_dir, exist_ok=True)
        with open(os.path.join(self.record_dir, "sizes.jsonl"), "a") as handle:
            handle.write(json.dumps({"site": fl_ctx.get_identity_name(), "round": round_number, "label": self.label, "bytes": size}) + "\n")
        return shareable


def build_job(record_dir: str, *, clients: int = 2, hostile_sites: int = 1, rounds: int = 3, config=None, send_weights: bool = False, downlink=None):
    """The FedJob: ScatterAndGather with fstq filters on every site; the last ``hostile_sites`` misbehave.

    ``config`` (an fstqcodec.EncodeConfig) sets the uplink (default: 1 bit/param, Fisher power
    0.5); ``downlink`` optionally compresses the global model.
    """
    from nvflare.job_config.api import FedJob
    from nvflare.job_config.defs import FilterType

    # Filters name their tasks: NVFLARE 2.9 looks them up by "<task>/<direction>", and the
    # Job API's default "*" matches no task.
    train = [AppConstants.TASK_TRAIN]
    sites = [f"site-{i}" for i in range(1, clients + hostile_sites + 1)]
    job = FedJob(name="fstq_lora_fedavg", min_clients=clients)
    # fstqcodec is installed on every site: import it there rather than copying it into the job.
    job.set_app_packages(["fstqcodec"])
    job.to(RecordingPersistor(record_dir), "server", id="persistor")
    job.to(FullModelShareableGenerator(), "server", id="shareable_generator")
    job.to(InTimeAccumulateWeightedAggregator(expected_data_kind=DataKind.WEIGHTS if send_weights else DataKind.WEIGHT_DIFF), "server", id="aggregator")
    controller = ScatterAndGather(
        # Every site answers every round (a dropped result counts as an answer): wait for all.
        min_clients=len(sites), num_rounds=rounds, wait_time_after_min_received=0, persistor_id="persistor",
        aggregator_id="aggregator", shareable_generator_id="shareable_generator", ignore_result_error=True,
    )
    job.to(controller, "server")
    job.to(FstqModelSender(downlink), "server", filter_type=FilterType.TASK_DATA, tasks=train)
    job.to(FstqUpdateDecoder(record_dir=record_dir), "server", filter_type=FilterType.TASK_RESULT, tasks=train)
    for index, site in enumerate(sites):
        job.to(LoraToyTrainer(send_weights=send_weights), site, tasks=[AppConstants.TASK_TRAIN])
        job.to(FstqModelReceiver(), site, filter_type=FilterType.TASK_DATA, tasks=train)
        job.to(SizeRecorder(record_dir, "raw"), site, filter_type=FilterType.TASK_RESULT, tasks=train)
        job.to(FstqUpdateEncoder(config), site, filter_type=FilterType.TASK_RESULT, tasks=train)
        if index >= clients:
            job.to(HostileReplies(), site, filter_type=FilterType.TASK_RESULT, tasks=train)
        job.to(SizeRecorder(record_dir, "sent"), site, filter_type=FilterType.TASK_RESULT, tasks=train)
    return job, sites


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Run the fstq NVFLARE job in the simulator.")
    parser.add_argument("--workspace", default="runs/nvflare-job")
    parser.add_argument("--clients", type=int, default=2, help="honest sites")
    parser.add_argument("--hostile-sites", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bits-per-param", type=float, default=1.0)
    parser.add_argument("--weights", action="store_true", help="the learner returns WEIGHTS instead of WEIGHT_DIFF")
    args = parser.parse_args(argv)
    workspace = os.path.abspath(args.workspace)
    record_dir = os.path.join(workspace, "records")
    config = fstqcodec.EncodeConfig(budget=fstqcodec.Budget(bits_per_param=args.bits_per_param), fisher_power=fstqcodec.FEDERATED_FISHER_POWER)
    job, sites = build_job(record_dir, clients=args.clients, hostile_sites=args.hostile_sites, rounds=args.rounds, config=config, send_weights=args.weights)
    job.simulator_run(os.path.join(workspace, "simulator"), threads=len(sites))
    with open(os.path.join(record_dir, "events.jsonl")) as handle:
        for line in handle:
            print(line.strip())


if __name__ == "__main__":
    main()
