"""Secret-looking values masked before anything is written or logged (manifest, card, records'
provenance, --print-config, the settings hash, a managed server's command line in the logs)."""
from __future__ import annotations

import re
from typing import Any

# a secret's name is a whole word of the key: HF_TOKEN, api_key, x-api-key — not max_tokens
_SECRET_KEY = re.compile(r"(^|[_-])(api[_-]?key|secret|password|passwd|token|authorization|bearer|"
                         r"credentials?)($|[_-])", re.I)
_SECRET_FLAG = re.compile(r"^--?(\w+[-_])*(api[-_]?key|secret|password|token)([-_]\w+)*(=.*)?$", re.I)


def _secret_key(name: str) -> bool:
    # ``api_key_env`` names the variable that holds the key, not the key
    return bool(_SECRET_KEY.search(name)) and not name.lower().endswith("_env")


def mask_secrets(value: Any) -> Any:
    """A copy of ``value`` with secret-looking values replaced by "***": mapping keys that name a
    secret (api_key, token, password, …), ``--api-key X`` / ``--token=X`` in argument lists, and
    ``sk-…`` / ``hf_…`` strings."""
    if isinstance(value, dict):
        return {k: "***" if _secret_key(str(k)) and v not in (None, "", {}, [])
                else mask_secrets(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        out: list[Any] = []
        hide_next = False
        for item in value:
            if hide_next:
                out.append("***")
                hide_next = False
                continue
            if isinstance(item, str) and _SECRET_FLAG.match(item):
                if "=" in item:
                    out.append(item.split("=", 1)[0] + "=***")
                else:
                    out.append(item)
                    hide_next = True
                continue
            out.append(mask_secrets(item))
        return out
    if isinstance(value, str) and re.match(r"^(sk-|hf_)[A-Za-z0-9_-]{8,}", value):
        return "***"
    return value


_TEXT_SECRETS = [
    (re.compile(r"(?i)(://)[^/@\s:]+:[^/@\s]+@"), r"\1***@"),                 # URL user:password@
    (re.compile(r"(?i)\b(bearer\s+)[^\s,;&\"']+"), r"\1***"),
    (re.compile(r"(?i)\b((?:[a-z]+[-_])*(?:token|api[-_]?key|password|secret)\s*[=:]\s*)[^\s,;&\"']+"), r"\1***"),
    (re.compile(r"\b(sk-|hf_)[A-Za-z0-9_-]{8,}"), r"\1***"),
    (re.compile(r"(?i)([?&](?:key|token|api_key|access_token|sig|signature)=)[^&\s\"']+"), r"\1***"),
]


def mask_text(text: str) -> str:
    """Free text (an error message, a failure's detail, a log line) with secret-looking parts
    replaced by "***": URL credentials, ``Bearer …`` / ``api_key=…`` / ``token: …`` values,
    ``sk-…`` / ``hf_…`` keys and key-like query parameters."""
    for pattern, replacement in _TEXT_SECRETS:
        text = pattern.sub(replacement, text)
    return text
