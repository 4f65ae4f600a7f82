"""The reference federated loop behind ``fstq simulate``.

Federated LoRA fine-tuning of a pretrained language model on non-IID clients, with the uplink encoded
by each method under comparison and measured in real bytes. A pipeline of stages:
:mod:`~fstqcodec.sim.config` (:class:`SimConfig`, every setting and its default),
:mod:`~fstqcodec.sim.data` (tasks), :mod:`~fstqcodec.sim.models` (model + LoRA),
:mod:`~fstqcodec.sim.partition` (Dirichlet splits), :mod:`~fstqcodec.sim.methods` (the encodings),
:mod:`~fstqcodec.sim.bandwidth` (link model), :mod:`~fstqcodec.sim.client` (a client's turn: local
training, evaluation, faults and delivery), :mod:`~fstqcodec.sim.loop` (the server's round loop),
:mod:`~fstqcodec.sim.report` (outputs), :mod:`~fstqcodec.sim.cli` (the command's options, generated
from :class:`SimConfig`) and :mod:`~fstqcodec.sim.flower_engine` (the same run on Flower's
simulation engine).

Nothing here is imported by ``import fstqcodec``; torch and friends load only when a run starts.
"""
