"""The HTTP backend for OpenAI-compatible servers and the ``vllm`` captioner that uses it.

``settings`` (the client's settings), ``messages`` (chat messages ordered for prefix caching),
``transports`` (SDK or bare aiohttp; what errors mean), ``endpoints`` (health, choice, backoff),
``client`` (``VllmChatClient``: retries, answer checks, metrics), ``captioner`` (``vllm``).
"""
