"""Checks of a model's answer, the same for every backend: empty, refusal, repetition loop,
truncation, malformed JSON or JSON not matching the requested schema. Pure functions."""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

ANSWER_REASONS: tuple[str, ...] = ("empty", "refusal", "repetition", "truncated", "bad_json")
DEFAULT_REFUSALS: tuple[str, ...] = (
    "i'm sorry", "i am sorry", "sorry, i", "i cannot", "i can't", "i can not", "i'm unable",
    "i am unable", "i'm not able", "i am not able", "i apologize", "as an ai",
    "i won't be able", "unfortunately, i can",
)


@dataclass(frozen=True)
class AnswerChecks:
    """Thresholds of the answer checks (a backend takes them from its settings)."""

    refusal_phrases: tuple[str, ...] = DEFAULT_REFUSALS
    ngram: int = 4
    max_repeats: int = 8
    min_tokens: int = 40
    min_unique_ratio: float = 0.2
    allow_truncated: bool = False

    @classmethod
    def from_settings(cls, settings: Any) -> AnswerChecks:
        """The checks configured in ``settings`` (the HTTP client's ``ClientSettings`` fields
        ``refusal_phrases``, ``repetition_*`` and ``allow_truncated``)."""
        return cls(tuple(p.lower() for p in settings.refusal_phrases), settings.repetition_ngram,
                   settings.repetition_max_repeats, settings.repetition_min_tokens,
                   settings.repetition_min_unique_ratio, settings.allow_truncated)

def is_empty(text: str | None) -> bool:
    """True when the answer has no visible characters."""
    return not (text or "").strip()


_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


def refusal_phrase(text: str, phrases: Sequence[str] = DEFAULT_REFUSALS) -> str | None:
    """The refusal phrase ``text`` opens with (case-insensitive), else None.

    Only the opening is checked: a caption may legitimately quote "I cannot" later on.
    """
    opening = text.translate(_QUOTES).strip().lstrip("\"'`*#>- \n").lower()[:200]
    for phrase in phrases:
        if opening.startswith(phrase.lower()):
            return phrase
    return None


def repetition(text: str, ngram: int = 4, max_repeats: int = 8, min_tokens: int = 40,
               min_unique_ratio: float = 0.2) -> str | None:
    """Describe a repetition loop in ``text`` (an n-gram repeated often, or few distinct words).

    Returns None for normal text. Words are ``\\w+`` runs, lower-cased.
    """
    tokens = re.findall(r"\w+", text.lower())
    if len(tokens) >= min_tokens:
        ratio = len(set(tokens)) / len(tokens)
        if ratio < min_unique_ratio:
            return f"only {ratio:.0%} of {len(tokens)} words are distinct"
    if len(tokens) >= ngram * max_repeats:
        grams = Counter(tuple(tokens[i:i + ngram]) for i in range(len(tokens) - ngram + 1))
        gram, count = grams.most_common(1)[0]
        if count >= max_repeats:
            return f"{' '.join(gram)!r} repeated {count} times"
    return None


def is_truncated(finish_reason: str | None) -> bool:
    """True when generation stopped at the token limit."""
    return finish_reason == "length"


_VALIDATORS: dict[str, Any] = {}


def parse_json_answer(text: str, schema: Mapping[str, Any] | None = None) -> tuple[Any, str | None]:
    """Parse ``text`` as JSON (a ```json fence is tolerated) and validate it against ``schema``.

    Returns (value, None) when fine, (None, what is wrong) otherwise.
    """
    body = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.S)
    if fenced:
        body = fenced.group(1)
    try:
        value = json.loads(body, strict=False)   # xgrammar may emit raw control chars in strings
    except ValueError as exc:
        return None, f"not JSON: {exc}"
    if schema is not None:
        error = _schema_error(value, schema)
        if error:
            return None, f"does not match the schema: {error}"
    return value, None


def _schema_error(value: Any, schema: Mapping[str, Any]) -> str | None:
    import jsonschema

    key = json.dumps(schema, sort_keys=True)
    validator = _VALIDATORS.get(key)
    if validator is None:
        cls = jsonschema.validators.validator_for(schema)
        validator = _VALIDATORS[key] = cls(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return f"{where}: {error.message[:200]}"


def check_answer(text: str, finish_reason: str | None, schema: Mapping[str, Any] | None = None,
                 checks: AnswerChecks = AnswerChecks()) -> tuple[Any, tuple[str, str] | None]:
    """Run every answer check; returns (parsed JSON or None, (reason, detail) or None).

    Order: empty, refusal, repetition, truncated, bad_json; the first that fails is reported
    (a looping answer usually also hits the token limit; "repetition" says more).
    """
    if is_empty(text):
        return None, ("empty", f"no text (finish_reason={finish_reason})")
    phrase = refusal_phrase(text, checks.refusal_phrases)
    if phrase:
        return None, ("refusal", f"answer opens with {phrase!r}: {text[:120]!r}")
    loop = repetition(text, checks.ngram, checks.max_repeats, checks.min_tokens,
                      checks.min_unique_ratio)
    if loop:
        return None, ("repetition", loop)
    if is_truncated(finish_reason) and not (checks.allow_truncated and schema is None):
        return None, ("truncated", f"stopped at the token limit after {len(text)} characters")
    if schema is None:
        return None, None
    parsed, error = parse_json_answer(text, schema)
    if error:
        return None, ("bad_json", f"{error}; answer starts {text[:120]!r}")
    return parsed, None
