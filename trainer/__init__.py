"""RegionCLIP trainer: mask-prompted CLIP alignment on the shards this project builds.

Modules, in the order data flows: config (settings), data (shard lists, streaming, loader,
resume position) and samples (record → tensors), text (tokenizers, LLM encoder), model
(open_clip towers + mask input + long text), losses, distributed, optim, checkpoint, evaluate,
report, and train (the loop and the command line). testing holds tiny inputs for tests.
"""
