"""What a request's output must match, as a hashable key for the compiled-grammar cache."""
from __future__ import annotations

import json
from dataclasses import dataclass

from rlserve.sampling import SamplingParams


@dataclass(frozen=True)
class GrammarSpec:
    kind: str      # "json_schema" | "json_object" | "regex" | "ebnf"
    source: str    # the schema as canonical JSON text, the regex, or the EBNF grammar

    @staticmethod
    def from_params(params: SamplingParams) -> GrammarSpec | None:
        if params.json_schema is not None:
            schema = params.json_schema
            text = json.dumps(schema, sort_keys=True) if isinstance(schema, dict) else schema
            return GrammarSpec("json_schema", text)
        if params.json_object:
            return GrammarSpec("json_object", "")
        if params.regex is not None:
            return GrammarSpec("regex", params.regex)
        if params.ebnf is not None:
            return GrammarSpec("ebnf", params.ebnf)
        return None
