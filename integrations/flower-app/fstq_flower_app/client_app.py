"""ClientApp: local LoRA training on one partition; FstqMod compresses what goes back.

The training code knows nothing of compression: it returns plain arrays, plus the diagonal Fisher
it accumulated as a second ArrayRecord named ``"fisher"``. :class:`fstqcodec.flower.FstqMod`
turns that into one fstq message of the update, with error feedback kept in the node's state,
and keeps the Fisher on the client.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fstqcodec.flower import FISHER_RECORD, FstqMod
from fstq_flower_app.links import answer_link_query
from fstq_flower_app.task import config_from_run_config, workbench

def _initial_adapter(context: Context) -> dict:
    """The shared initial adapter: a "previous"- or "received"-filled proxy's hidden entries before the first round."""
    settings = config_from_run_config(context.run_config, clients=int(context.node_config["num-partitions"]))
    return workbench(settings).initial_state


# FstqMod first: it is the outermost mod, so any clipping or DP mod added after it sees plain arrays.
app = ClientApp(mods=[FstqMod(initial_model=_initial_adapter)])


def _arrays(tensors) -> ArrayRecord:
    return ArrayRecord({name: Array(value) for name, value in tensors.items()})


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received adapter on this node's partition for one round."""
    partition_id = int(context.node_config["partition-id"])
    settings = config_from_run_config(context.run_config, clients=int(context.node_config["num-partitions"]))
    received = {name: array.numpy() for name, array in msg.content["arrays"].items()}
    server_round = int(msg.content["config"]["server-round"])
    local = workbench(settings).train(received, partition_id, server_round)
    content = RecordDict(
        {
            "arrays": _arrays(local.trained),
            "metrics": MetricRecord({"num-examples": local.num_examples, "train-loss": local.mean_loss}),
            FISHER_RECORD: _arrays(local.fisher),
        }
    )
    return Message(content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this node's uplink bandwidth (asked before round 1 when ``deadline-s > 0``)."""
    return answer_link_query(msg, context.node_config, context.run_config)
