"""A Flower App that fine-tunes a LoRA adapter federatedly with an fstq-compressed uplink."""
