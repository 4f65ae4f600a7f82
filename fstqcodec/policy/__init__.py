"""Policy: what the encoder should spend bits on (Fisher importance, budgets, allocation).

The policy decides; the codec obeys. Nothing here touches bytes on the wire.
"""
