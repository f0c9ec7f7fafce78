"""Captioners: where the texts and tags come from.

``attributes`` (measured colour, position, size, shape; no weights; the default) and
``no_captions`` (``none``: empty texts) write text themselves. ``vllm`` and ``transformers`` run
a caption *program* (``program``: the YAML format, ``programs/``: the shipped ones) with the
``engine`` on a model *backend* (``backends/``), showing the model each region through
``visual_prompts``.
"""
