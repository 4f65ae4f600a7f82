"""The fstq Flower protocol (spec/FLOWER.md) against its implementation, fstqcodec.flower.protocol.

The spec's tables are parsed here and compared with the module's constants, so that neither can
change without the other. Then what each side does on each mismatch the spec lists.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("flwr", minversion="1.22")

from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg

import fstqcodec
from fstqcodec.flower import FstqMod, FstqStrategy, LinkBudget, protocol
from fstqcodec.flower.protocol import ProtocolError, TrainRequest

from test_flower import FakeApp, encoder_of, model, new_context, request, train_message, with_encoder

SPEC = pathlib.Path(__file__).resolve().parents[1] / "spec" / "FLOWER.md"


def spec_table(heading: str) -> list[list[str]]:
    """The rows (cells without backquotes) of the first table under the section ``heading``."""
    text = SPEC.read_text()
    section = text[text.index(heading):]
    section = section[: section.find("\n## ", 1) if "\n## " in section[1:] else len(section)]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    cells = [[cell.strip().strip("`") for cell in row.strip("|").split("|")] for row in rows]
    return [row for row in cells[2:]]  # past the header and its rule


TYPE_NAMES = {int: "int", str: "str", bool: "bool"}


def test_the_spec_lists_exactly_the_request_keys_with_their_types():
    table = {row[0]: row[1] for row in spec_table("## 3. The request")}
    assert table == {key: TYPE_NAMES[kind] for key, kind in protocol.REQUEST_KEYS.items()}


def test_the_spec_lists_exactly_the_encoder_members_and_their_defaults():
    table = {row[0]: row for row in spec_table("## 4. The encoder object")}
    # get_config leaves `unbiased` out while it is False (requests read as before the option).
    config = {**fstqcodec.EncodeConfig().get_config(), "unbiased": False}
    assert set(table) == set(config) == {"id"} | {f.name for f in dataclasses.fields(fstqcodec.EncodeConfig)}
    for name, row in table.items():
        default = json.loads(row[2])
        if name == "fisher_power":
            assert default == fstqcodec.FEDERATED_FISHER_POWER  # the protocol's own default
        else:
            assert default == config[name], name


def test_the_spec_names_the_records_stypes_and_version():
    names = {row[0]: row[1] for row in spec_table("## 2. Names")}
    assert names == {
        "CONFIG_RECORD": protocol.CONFIG_RECORD,
        "MESSAGE_ARRAY": protocol.MESSAGE_ARRAY,
        "STYPE_MODEL": protocol.STYPE_MODEL,
        "STYPE_UPDATE": protocol.STYPE_UPDATE,
        "STYPE_PROXY": protocol.STYPE_PROXY,
        "PROTOCOL_VERSION": str(protocol.PROTOCOL_VERSION),
        "MOD_FAILED_PRECONDITION": str(protocol.MOD_FAILED_PRECONDITION),
    }
    text = SPEC.read_text()
    assert f"| **Protocol version** | {protocol.PROTOCOL_VERSION} |" in text
    assert text.startswith(f"# The fstq Flower protocol, version {protocol.PROTOCOL_VERSION}\n")


def test_a_request_reads_back_as_it_was_written():
    encoder = fstqcodec.EncodeConfig(budget=fstqcodec.Budget(bits_per_param=0.3), block_size=32,
                                     seed=7, fisher_power=0.25, rounding="stochastic")
    sent = TrainRequest(encoder, error_feedback=True, server_round=3, last_accepted_round=2)
    record = sent.to_record()
    assert sorted(record.keys()) == sorted(protocol.REQUEST_KEYS)
    assert TrainRequest.from_record(record) == sent


def test_an_unbiased_request_reads_back_and_a_plain_one_does_not_name_the_option():
    # A plain request's encoder JSON is what earlier versions wrote: older clients still read it.
    plain = fstqcodec.EncodeConfig(budget=fstqcodec.Budget(bits_per_param=0.3))
    assert "unbiased" not in json.loads(TrainRequest(plain, error_feedback=True, server_round=1, last_accepted_round=0).to_record()["encoder"])
    sent = TrainRequest(plain.replace(unbiased=True), error_feedback=False, server_round=1, last_accepted_round=0)
    assert TrainRequest.from_record(sent.to_record()).encoder.unbiased is True


def test_a_request_without_fisher_power_gets_the_federated_default():
    record = request(None)
    record["encoder"] = json.dumps({"id": "fstq", "budget": {"ratio": 8}})
    assert TrainRequest.from_record(record).encoder.fisher_power == fstqcodec.FEDERATED_FISHER_POWER


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"version": protocol.PROTOCOL_VERSION + 1}, "upgrade fstqcodec on the client"),
        ({"version": 2}, "upgrade fstqcodec on the server"),
        ({"proxy-fill": "mean"}, "'proxy-fill' must be one of"),
        ({"proxy-fill": None}, "'proxy-fill' as str"),
        ({"version": "2"}, "no valid 'version'"),
        ({"version": None}, "no valid 'version'"),
        ({"encoder": None}, "'encoder' as str"),
        ({"error-feedback": 1}, "'error-feedback' as bool"),
        ({"round": True}, "'round' as int"),
        ({"round": 0, "last-accepted-round": 0}, "inconsistent rounds"),
        ({"round": 2, "last-accepted-round": 2}, "inconsistent rounds"),
        ({"encoder": "{not json"}, "cannot read the encoder config"),
        ({"encoder": "[1, 2]"}, "a JSON object is expected"),
        ({"encoder": '{"budget": {"ratio": NaN}}'}, "cannot read the encoder config"),
        ({"encoder": '{"window": 3}'}, "unknown encoder option"),
        ({"encoder": '{"id": "zfp"}'}, "not an fstq encoder config"),
        ({"encoder": '{"block_size": 0}'}, "block_size"),
    ],
)
def test_the_mod_answers_an_unreadable_request_with_an_error_reply(change, reason):
    fstq_request = request()
    for key, value in change.items():
        if value is None:
            del fstq_request[key]
        else:
            fstq_request[key] = value
    with pytest.raises(ProtocolError, match=re.escape(reason)):
        TrainRequest.from_record(fstq_request)
    app = FakeApp(model(1, scale=0.001))
    reply = FstqMod()(train_message(model(0), fstq_request), new_context(), app)
    assert reply.has_error() and reply.error.code == protocol.MOD_FAILED_PRECONDITION
    assert reason in reply.error.reason, reply.error.reason
    assert app.seen == []  # the app never ran on a request the mod could not read


def test_the_mod_keeps_error_feedback_as_the_public_state_of_error_feedback():
    context = new_context()
    step = model(1, scale=0.001)
    FstqMod()(train_message(model(0), request(server_round=1)), context, FakeApp(step))
    stored = {name: dict(context.state[key].items()) for name, key in
              [("residual", "fstq.residual"), ("last_update", "fstq.residual.sent"),
               ("residual_before", "fstq.residual.before")]}
    state = {part: {n: a.numpy() for n, a in arrays.items()} for part, arrays in stored.items()}
    feedback = fstqcodec.ErrorFeedback.from_state(state)
    feedback.message_lost()  # as if round 1 never arrived: the whole step is owed
    for name, value in step.items():
        np.testing.assert_allclose(feedback.residual[name], value, atol=1e-7)
    assert context.state["fstq.residual.sent-round"]["round"] == 1


# ------------------------------------------------------------------------------------------
# The strategy's one EncodeConfig
# ------------------------------------------------------------------------------------------


def test_the_strategy_sends_its_encode_config_with_the_per_client_seed_and_budget():
    config = fstqcodec.EncodeConfig(budget=fstqcodec.Budget(bits_per_param=0.3), block_size=32,
                                    fisher_power=0.25, rounding="stochastic", seed=5)
    strategy = FstqStrategy(FedAvg(), config)
    sent = encoder_of(strategy._client_request(server_round=2, node_id=11))
    assert sent.replace(seed=config.seed) == config and sent.seed != config.seed
    assert sent == encoder_of(FstqStrategy(FedAvg(), config)._client_request(2, 11))  # reproducible

    per_node = FstqStrategy(FedAvg(), config.replace(budget=None),
                            budget=LinkBudget({11: 8000.0}, deadline_s=1.0))
    assert encoder_of(per_node._client_request(2, 11)).budget == fstqcodec.Budget(max_bytes=1000)


def test_the_strategy_defaults_to_the_federated_fisher_power_and_keeps_the_old_keywords():
    assert FstqStrategy(FedAvg()).config.fisher_power == fstqcodec.FEDERATED_FISHER_POWER
    old_style = FstqStrategy(FedAvg(), budget=fstqcodec.Budget(ratio=8), block_size=32, seed=4)
    assert old_style.config == fstqcodec.EncodeConfig(
        budget=fstqcodec.Budget(ratio=8), block_size=32, seed=4,
        fisher_power=fstqcodec.FEDERATED_FISHER_POWER)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((fstqcodec.EncodeConfig(),), {"block_size": 32}, "inside config"),
        ((fstqcodec.EncodeConfig(budget=100),), {"budget": fstqcodec.Budget(ratio=8)}, "not both"),
        ((fstqcodec.EncodeConfig(bits=4),), {"budget": LinkBudget({}, 1.0, 1e6)}, "not both"),
        (({"budget": None},), {}, "EncodeConfig"),
        ((), {"window": 3}, "unexpected keyword"),
        ((), {"budget": 1000}, "budget must be"),
    ],
)
def test_the_strategy_refuses_ambiguous_or_unknown_options(args, kwargs, match):
    with pytest.raises(TypeError, match=match):
        FstqStrategy(FedAvg(), *args, **kwargs)


def test_a_server_request_the_mod_cannot_read_is_refused_with_its_reason():
    fstq_request = request()
    fstq_request["encoder"] = with_encoder(fstq_request, codebook="nf5")
    reply = FstqMod()(train_message(model(0), fstq_request), new_context(), FakeApp(model(1, 0.001)))
    assert reply.has_error() and "cannot read the encoder config" in reply.error.reason


SERVER_MODULES = ("flwr.serverapp", "fstqcodec.flower.strategy")


def test_the_client_modules_import_no_server_code():
    """mod.py and protocol.py name neither flwr.serverapp nor the strategy module."""
    package = pathlib.Path(fstqcodec.__file__).parent / "flower"
    for module in ("mod.py", "protocol.py"):
        tree = ast.parse((package / module).read_text())
        imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                     for alias in node.names]
        assert not [name for name in imported if name.startswith(("flwr.serverapp", "strategy"))
                    or name.endswith(".strategy")], (module, imported)


def test_importing_the_mod_loads_no_server_code():
    """A client process (a fresh interpreter) that imports the mod loads no server code.

    Flower 1.42's own ``flwr/__init__.py`` imports ``flwr.serverapp``, so any ``import flwr.app``
    loads it; what is checked is that the mod adds no server module to what Flower loads itself.
    """
    code = (
        "import sys\n"
        "import flwr.app, flwr.clientapp\n"
        "before = set(sys.modules)\n"
        "import fstqcodec.flower.mod\n"
        "from fstqcodec.flower import FstqMod, STYPE_UPDATE\n"
        f"added = [m for m in set(sys.modules) - before if m.startswith({SERVER_MODULES!r})]\n"
        "assert not added, sorted(added)\n"
        "assert 'fstqcodec.flower.mod' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
