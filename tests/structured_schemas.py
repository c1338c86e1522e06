"""JSON schemas of varied shape for the structured-output tests and bench/bench_structured.py:
what each one exercises is its name. Free-form strings carry a maxLength so that a small model
sampling at temperature 1 ends them within the tests' token budget."""

from __future__ import annotations

NAME = {"type": "string", "minLength": 1, "maxLength": 20}

SCHEMAS: dict[str, dict] = {
    "flat_required": {
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "optional_fields": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 30},
            "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
            "rating": {"type": "number", "minimum": 0, "maximum": 10},
        },
        "required": ["title"],
        "additionalProperties": False,
    },
    "enum_field": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["color", "count"],
    },
    "int_array_bounds": {
        "type": "object",
        "properties": {"digits": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4}},
        "required": ["digits"],
    },
    "enum_array": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["news", "sports", "tech"]}, "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
    },
    "nested_object": {
        "type": "object",
        "properties": {
            "name": NAME,
            "address": {
                "type": "object",
                "properties": {"street": {"type": "string", "maxLength": 30}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["street", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
    },
    "any_of": {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer", "minimum": -5, "maximum": 5}, {"type": "string", "maxLength": 10}, {"type": "null"}]}},
        "required": ["value"],
    },
    "string_pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}},
        "required": ["code"],
    },
    "format_date": {"type": "object", "properties": {"born": {"type": "string", "format": "date"}}, "required": ["born"]},
    "format_ipv4": {"type": "object", "properties": {"host": {"type": "string", "format": "ipv4"}}, "required": ["host"]},
    "format_uuid": {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}}, "required": ["id"]},
    "format_date_time": {"type": "object", "properties": {"at": {"type": "string", "format": "date-time"}}, "required": ["at"]},
    "number_bounds": {
        "type": "object",
        "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90}, "lon": {"type": "number", "minimum": -180, "maximum": 180}},
        "required": ["lat", "lon"],
    },
    "exclusive_bounds": {
        "type": "object",
        "properties": {"p": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}, "k": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 4}},
        "required": ["p", "k"],
    },
    "boolean_and_null": {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "note": {"type": "null"}},
        "required": ["ok", "note"],
    },
    "const_and_enum": {
        "type": "object",
        "properties": {"version": {"const": "1.0"}, "kind": {"enum": ["a", "b", 3]}},
        "required": ["version", "kind"],
    },
    "array_of_objects": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 100}, "tag": {"enum": ["x", "y"]}},
                    "required": ["id", "tag"],
                    "additionalProperties": False,
                },
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["items"],
    },
    "refs_and_defs": {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"]}},
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
    },
    "top_level_array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "minItems": 3, "maxItems": 3},
    "top_level_enum": {"enum": ["yes", "no", "unsure"]},
    "multiple_of": {"type": "object", "properties": {"step": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 50}}, "required": ["step"]},
    "string_lengths": {"type": "object", "properties": {"word": {"type": "string", "minLength": 2, "maxLength": 8}}, "required": ["word"]},
    "typed_map": {
        "type": "object",
        "propertyNames": {"pattern": "^[a-z]{1,8}$"},
        "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 9},
        "maxProperties": 3,
    },
    "tuple_prefix_items": {"type": "array", "prefixItems": [{"enum": ["add", "sub"]}, {"type": "integer", "minimum": 0, "maximum": 9}], "items": False},
    "deep_nesting": {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "object", "properties": {"c": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}}, "required": ["c"]}}, "required": ["b"]}
        },
        "required": ["a"],
    },
}
