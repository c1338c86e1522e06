"""What a request constrains its output to: a JSON schema, any JSON object, a regex, one of a
list of strings, or an EBNF grammar (vLLM's `StructuredOutputsParams`, same field names).

Validation here is what can be checked without the tokenizer: exactly one constraint, the right
types, and no JSON-schema keyword the grammar library would silently ignore (an output would
then "match" the grammar and still fail the schema). Compilation is engine.grammar's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Keywords xgrammar 0.2 accepts but does not enforce (measured: a violating document is
# accepted), refused as OpenAI's strict mode refuses them, rather than quietly not honoured.
UNSUPPORTED_KEYWORDS = (
    "allOf", "oneOf", "not", "if", "then", "else", "dependentRequired", "dependentSchemas",
    "uniqueItems", "contentEncoding", "contentMediaType", "contentSchema",
)  # fmt: skip
# String formats xgrammar enforces; any other would be ignored, so it is refused.
SUPPORTED_FORMATS = frozenset({
    "date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uri",
    "uri-reference", "uri-template", "uuid",
})  # fmt: skip
# Pairs of keywords xgrammar enforces alone but not together (measured: with a pattern or format,
# string lengths are not checked; with a format, the pattern is not).
_UNENFORCED_COMBINATIONS = (
    ("minLength/maxLength together with pattern or format", (("minLength", "maxLength"), ("pattern", "format"))),
    ("pattern together with format", (("pattern",), ("format",))),
)
# Where a schema nests further schemas: a keyword is only a keyword at a schema position
# (a property may well be named "not").
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "contains", "propertyNames", "unevaluatedProperties", "unevaluatedItems")


@dataclass
class StructuredOutputsParams:
    """Set exactly one field. `json` is a JSON schema (dict or its JSON text); `json_object`
    asks for any JSON object; `regex` a regular expression; `choice` one of the strings;
    `grammar` an EBNF grammar (xgrammar's / GBNF syntax, root rule `root`)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        set_fields = [name for name in ("json", "regex", "choice", "grammar", "json_object") if getattr(self, name) not in (None, False)]
        if len(set_fields) != 1:
            raise ValueError(
                "SamplingParams.structured_outputs must set exactly one of json, regex, choice, grammar, "
                f"json_object; got {set_fields or 'none'}"
            )
        self.kind = set_fields[0]
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise ValueError(f"SamplingParams.structured_outputs json schema is not valid JSON: {e}") from None
        if self.json is not None:
            if not isinstance(self.json, dict):
                raise ValueError(f"SamplingParams.structured_outputs json schema must be a JSON object, got {type(self.json).__name__}")
            check_schema(self.json)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"SamplingParams.structured_outputs {name} must be a non-empty string, got {value!r}")
        if self.choice is not None:
            if not isinstance(self.choice, list) or not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError(f"SamplingParams.structured_outputs choice must be a non-empty list of non-empty strings, got {self.choice!r}")
        if self.json_object not in (None, True, False):
            raise ValueError(f"SamplingParams.structured_outputs json_object must be a boolean, got {self.json_object!r}")

    @property
    def key(self) -> tuple[str, str]:
        """What the compiled grammar depends on: equal keys compile to equal grammars. Property
        order is kept (it is the order the output writes them in)."""
        if self.kind == "json":
            return ("json", json.dumps(self.json, separators=(",", ":")))
        if self.kind == "choice":
            return ("choice", json.dumps(self.choice))
        if self.kind == "json_object":
            return ("json_object", "")
        return (self.kind, getattr(self, self.kind))


def check_schema(schema: Any, path: str = "$") -> None:
    """Refuse what the grammar could not honour, naming the keyword and where it is."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ValueError(f"SamplingParams.structured_outputs json schema at {path} must be an object or a boolean")
    for keyword in UNSUPPORTED_KEYWORDS:
        if keyword in schema:
            raise ValueError(
                f"SamplingParams.structured_outputs json schema keyword {keyword!r} (at {path}) is not supported: "
                "the grammar could not enforce it"
            )
    fmt = schema.get("format")
    if fmt is not None and fmt not in SUPPORTED_FORMATS:
        raise ValueError(
            f"SamplingParams.structured_outputs json schema format {fmt!r} (at {path}) is not supported; "
            f"supported: {sorted(SUPPORTED_FORMATS)}"
        )
    for problem, present in _UNENFORCED_COMBINATIONS:
        if all(any(k in schema for k in group) for group in present):
            raise ValueError(f"SamplingParams.structured_outputs json schema {problem} (at {path}) is not supported: the grammar could not enforce it")
    if "multipleOf" in schema and (schema.get("type") != "integer" or not isinstance(schema["multipleOf"], int)):
        raise ValueError(
            f"SamplingParams.structured_outputs json schema keyword 'multipleOf' (at {path}) is only supported on integers"
        )
    for name in _SCHEMA_MAPS:
        for key, sub in (schema.get(name) or {}).items():
            check_schema(sub, f"{path}.{name}.{key}")
    for name in _SCHEMA_LISTS:
        for i, sub in enumerate(schema.get(name) or []):
            check_schema(sub, f"{path}.{name}[{i}]")
    for name in _SCHEMA_VALUES:
        if name in schema:
            check_schema(schema[name], f"{path}.{name}")
