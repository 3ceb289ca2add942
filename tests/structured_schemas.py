"""JSON schemas of varied shape for structured-output tests (bounded so samples finish)."""
from __future__ import annotations

NAME = {"type": "string", "minLength": 1, "maxLength": 20}
INT = {"type": "integer", "minimum": -1000, "maximum": 1000}   # bounded: unbounded digits can run on

SCHEMAS: dict[str, dict] = {
    "flat_object": {"type": "object", "properties": {"name": NAME, "age": INT},
                    "required": ["name", "age"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": INT, "email": NAME},
                 "required": ["id", "email"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False},
    "array_bounds": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3}},
        "required": ["tags"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
             "required": ["color"], "additionalProperties": False},
    "number_bounds": {"type": "object", "properties": {
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["score", "ratio"], "additionalProperties": False},
    "string_pattern": {"type": "object", "properties": {
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
        "required": ["zip", "code"], "additionalProperties": False},
    "optional_fields": {"type": "object", "properties": {"title": NAME, "subtitle": NAME,
                                                         "pages": {"type": "integer", "minimum": 1, "maximum": 999}},
                        "required": ["title"], "additionalProperties": False},
    "defs_ref": {"$defs": {"point": {"type": "object", "properties": {"x": INT, "y": INT},
                                     "required": ["x", "y"], "additionalProperties": False}},
                 "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
                 "required": ["start", "end"], "additionalProperties": False},
    "array_of_objects": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "properties": {"k": NAME, "v": INT}, "required": ["k", "v"],
        "additionalProperties": False}},
    "boolean_and_null": {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": "null"}},
                         "required": ["ok", "note"], "additionalProperties": False},
    "any_of": {"type": "object", "properties": {"value": {"anyOf": [INT, NAME]}},
               "required": ["value"], "additionalProperties": False},
    "const": {"type": "object", "properties": {"version": {"const": "v1"}, "n": INT},
              "required": ["version", "n"], "additionalProperties": False},
    "int_enum_array": {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 2, "maxItems": 4},
    "date_format": {"type": "object", "properties": {"day": {"type": "string", "format": "date"}},
                    "required": ["day"], "additionalProperties": False},
    "deep": {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object",
             "properties": {"c": {"type": "array", "items": INT, "maxItems": 2}},
             "required": ["c"], "additionalProperties": False}}, "required": ["b"], "additionalProperties": False}},
             "required": ["a"], "additionalProperties": False},
    "top_level_string": {"type": "string", "maxLength": 15},
}

REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(yes|no|maybe)", r"[A-Z][a-z]{2,8} [A-Z][a-z]{2,8}", r"\d+\.\d{2} (USD|EUR)"]

# Arithmetic over single digits: expr ::= term (("+" | "-") term)*, terms are digits or parenthesised exprs.
EBNF = r'''
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= [0-9] | "(" expr ")"
'''
