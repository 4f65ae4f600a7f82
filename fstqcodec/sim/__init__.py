"""The reference federated loop behind ``fstq simulate``.

Federated LoRA fine-tuning of a pretrained language model on non-IID clients, with the uplink encoded
by each method under comparison and measured in real bytes. Submodules: :mod:`~fstqcodec.sim.data`
(tasks), :mod:`~fstqcodec.sim.models` (model + LoRA), :mod:`~fstqcodec.sim.partition` (Dirichlet
splits), :mod:`~fstqcodec.sim.methods` (the encodings), :mod:`~fstqcodec.sim.bandwidth` (link model),
:mod:`~fstqcodec.sim.loop` (the loop), :mod:`~fstqcodec.sim.report` (outputs) and
:mod:`~fstqcodec.sim.cli` (the command's options).

Nothing here is imported by ``import fstqcodec``; torch and friends load only when a run starts.
"""
