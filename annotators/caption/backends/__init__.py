"""Model backends of the caption-program engine: ``generate(requests) -> answers``
(``base``), with the answer checks (``checks``) and image preparation (``images``) every backend
shares.

``openai_api/``: OpenAI-compatible servers over HTTP (vLLM, SGLang, TGI; the ``vllm``
captioner). ``transformers_local``: a Hugging Face model in this process (the ``transformers``
captioner).
"""
