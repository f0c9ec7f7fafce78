"""Checks of a model's answer, the same for every backend. Pure functions.

A model's answer is data, never code: it is cleaned, bounded and parsed strictly, and nothing
here (or in the engine that puts earlier answers into later prompts) evaluates it.

* Size: an answer longer than ``max_chars`` (``MAX_ANSWER_CHARS``: far above what ``max_tokens``
  lets a model write) is rejected (``answer_too_large``), before any other check; a cut caption
  would be a wrong caption, so nothing is cut.
* Characters: C0 and C1 control characters and DEL are removed, except tab and line feed (a
  CR LF becomes LF); lone UTF-16 surrogates (a JSON ``\\ud800`` escape) become U+FFFD. Invalid
  UTF-8 in a server's body is replaced by U+FFFD where the body is decoded (the HTTP client).
* Then: empty, refusal, repetition loop, truncation.
* Structured answers (a JSON schema was asked for): nesting deeper than ``max_json_depth``
  (``MAX_JSON_DEPTH``) is rejected by a linear scan before parsing (``answer_too_deep``; a
  JSON bomb never reaches the recursive parser), then ``json.loads`` (``answer_not_json``),
  the strings of the value cleaned as above, then validation against the schema
  (``answer_schema``).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Sequence

ANSWER_REASONS: tuple[str, ...] = ("answer_too_large", "empty", "refusal", "repetition",
                                   "truncated", "answer_too_deep", "answer_not_json",
                                   "answer_schema")
MAX_ANSWER_CHARS = 32_768      # ~8k tokens of English; the default max_tokens (512) writes ~2.5k
MAX_JSON_DEPTH = 16            # the shipped schemas nest 2 deep (an object holding a list)
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
    max_chars: int = MAX_ANSWER_CHARS
    max_json_depth: int = MAX_JSON_DEPTH

    @classmethod
    def from_settings(cls, settings: Any) -> AnswerChecks:
        """The checks configured in ``settings`` (the HTTP client's ``ClientSettings`` fields
        ``refusal_phrases``, ``repetition_*``, ``allow_truncated`` and ``max_answer_chars``)."""
        return cls(tuple(p.lower() for p in settings.refusal_phrases), settings.repetition_ngram,
                   settings.repetition_max_repeats, settings.repetition_min_tokens,
                   settings.repetition_min_unique_ratio, settings.allow_truncated,
                   settings.max_answer_chars)


class CheckedAnswer(NamedTuple):
    """What ``check_answer`` makes of an answer: the cleaned text, the parsed JSON (when a
    schema was asked for) and the first check that failed, as (reason, detail), or None."""

    text: str
    parsed: Any
    problem: tuple[str, str] | None


# C0 controls but tab and line feed, DEL, C1 controls; lone surrogates (only a JSON escape or a
# surrogateescape decode can make them; they cannot be written as UTF-8).
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def _replace_unsafe(match: re.Match[str]) -> str:
    return "\ufffd" if match.group() >= "\ud800" else ""


def clean_text(text: str) -> str:
    """``text`` without control characters (tab and line feed kept) and with lone surrogates
    replaced by U+FFFD; other text, markup and braces included, is kept as it is."""
    if _UNSAFE.search(text) is None:      # the common case: nothing to do, no copy
        return text
    return _UNSAFE.sub(_replace_unsafe, text)


def clean_value(value: Any) -> Any:
    """A parsed JSON value with ``clean_text`` applied to every string, keys included.

    Recursive: call it on values within ``max_json_depth`` (``check_answer`` does)."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [clean_value(v) for v in value]
    if isinstance(value, dict):
        return {clean_text(k): clean_value(v) for k, v in value.items()}
    return value


# JSON tokens that change the nesting depth, strings skipped whole (an unterminated string runs
# to the end). Linear: the alternatives never overlap, so nothing backtracks.
_DEPTH_TOKENS = re.compile(r'"(?:[^"\\]|\\[\s\S])*"?|[\[\]{}]')


def too_deep(text: str, limit: int) -> bool:
    """True when JSON ``text`` nests arrays and objects more than ``limit`` deep. Brackets inside
    strings do not count. A linear scan that stops past the limit: no parsing, no recursion."""
    if text.count("[") + text.count("{") <= limit:
        return False                       # cannot nest deeper than it has openers
    depth = 0
    for match in _DEPTH_TOKENS.finditer(text):
        char = match.group()[0]
        if char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


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


def parse_json_answer(text: str, schema: Mapping[str, Any] | None = None,
                      max_depth: int = MAX_JSON_DEPTH) -> tuple[Any, tuple[str, str] | None]:
    """Parse ``text`` as JSON (a ```json fence is tolerated), clean its strings
    (``clean_value``) and validate it against ``schema``.

    Returns (value, None) when fine, (None, (reason, what is wrong)) otherwise; reasons:
    ``answer_too_deep``, ``answer_not_json``, ``answer_schema``.
    """
    body = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.S)
    if fenced:
        body = fenced.group(1)
    if too_deep(body, max_depth):
        return None, ("answer_too_deep", f"JSON nested deeper than {max_depth} levels")
    try:
        value = json.loads(body, strict=False)   # xgrammar may emit raw control chars in strings
    except (ValueError, RecursionError) as exc:  # ValueError: also too many digits in an int
        return None, ("answer_not_json", f"not JSON: {str(exc)[:200]}")
    value = clean_value(value)
    if schema is not None:
        error = _schema_error(value, schema)
        if error:
            return None, ("answer_schema", f"does not match the schema: {error}")
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
                 checks: AnswerChecks = AnswerChecks()) -> CheckedAnswer:
    """Clean ``text`` and run every answer check (see the module docstring).

    Order: answer_too_large, then (on the cleaned text) empty, refusal, repetition, truncated,
    and for a structured answer answer_too_deep, answer_not_json, answer_schema; the first that
    fails is reported (a looping answer usually also hits the token limit; "repetition" says
    more). Details quote at most the answer's first 120 characters, escaped.
    """
    if len(text) > checks.max_chars:
        return CheckedAnswer("", None, ("answer_too_large", f"{len(text)} characters, more than "
                                        f"the {checks.max_chars} allowed; starts {text[:120]!r}"))
    text = clean_text(text)
    if is_empty(text):
        return CheckedAnswer(text, None, ("empty", f"no text (finish_reason={finish_reason})"))
    phrase = refusal_phrase(text, checks.refusal_phrases)
    if phrase:
        return CheckedAnswer(text, None, ("refusal",
                                          f"answer opens with {phrase!r}: {text[:120]!r}"))
    loop = repetition(text, checks.ngram, checks.max_repeats, checks.min_tokens,
                      checks.min_unique_ratio)
    if loop:
        return CheckedAnswer(text, None, ("repetition", loop))
    if is_truncated(finish_reason) and not (checks.allow_truncated and schema is None):
        return CheckedAnswer(text, None, ("truncated", f"stopped at the token limit after "
                                          f"{len(text)} characters"))
    if schema is None:
        return CheckedAnswer(text, None, None)
    parsed, error = parse_json_answer(text, schema, checks.max_json_depth)
    if error:
        return CheckedAnswer(text, None, (error[0], f"{error[1]}; answer starts {text[:120]!r}"))
    return CheckedAnswer(text, parsed, None)
