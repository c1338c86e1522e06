"""Regenerate schemas.json from OpenAI's published spec (github.com/openai/openai-openapi).

    git clone https://github.com/openai/openai-openapi && python tests/openai_spec/extract.py openai-openapi/openapi.json COMMIT

Keeps only the response schemas this server produces and what they reference, without the
prose. One translation: a few schemas still use OpenAPI 3.0's `"nullable": true` (which
JSON Schema ignores) although the document says 3.1; it becomes `anyOf [..., null]`, which is
what the spec's authors mean (OpenAI sends `"finish_reason": null` in stream chunks itself).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOTS = [
    "CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "CreateCompletionResponse",
    "ListModelsResponse", "Model", "ErrorResponse",
]  # fmt: skip
PROSE = {"description", "x-oaiMeta", "example", "examples", "title", "x-stainless-const", "deprecated", "x-oaiTypeLabel", "x-oaiExpandable"}


def _strip(node):
    if isinstance(node, list):
        return [_strip(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _strip(v) for k, v in node.items() if k not in PROSE}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


def _refs(node, found: set[str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                found.add(value.rsplit("/", 1)[-1])
            else:
                _refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _refs(value, found)


def extract(spec: dict) -> dict:
    schemas = spec["components"]["schemas"]
    wanted, todo = set(), list(ROOTS)
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        wanted.add(name)
        found: set[str] = set()
        _refs(schemas[name], found)
        todo.extend(found - wanted)
    return {name: _strip(schemas[name]) for name in sorted(wanted)}


if __name__ == "__main__":
    spec_path, commit = sys.argv[1], sys.argv[2]
    spec = json.loads(Path(spec_path).read_text())
    out = {
        "source": "https://github.com/openai/openai-openapi/blob/" + commit + "/openapi.json",
        "spec_version": spec["info"]["version"],
        "license": "MIT (c) OpenAI, see the source repository's LICENSE",
        "components": {"schemas": extract(spec)},
    }
    Path(__file__).with_name("schemas.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
