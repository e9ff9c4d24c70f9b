"""Which JSON-Schema keywords the grammar (xgrammar 0.2.x, ctxforge.structured) enforces exactly.

xgrammar compiles any schema, but it drops what it cannot express: `uniqueItems`, `not`, `allOf`,
`if`/`then`/`else`, `contains`, `dependentRequired`, numeric `multipleOf`, a `$ref` that is not a
local `#...` pointer (`/$defs/X`), keywords beside a `$ref` or an `anyOf`, string or number bounds
without a `type`, `minLength`/`maxLength` beside a `pattern` or `format`, and formats outside its set.
The output then violates the schema, or is not JSON at all. `unenforceable(schema)` walks a schema
against an allow-list (each entry was checked by forcing valid and invalid strings through
xgrammar's matcher; tests/test_schema_keywords.py keeps those checks) and returns the first
keyword outside it with its JSON-pointer path, so a strict request is enforced exactly or refused.
What xgrammar narrows (an object without `additionalProperties` admits no extra keys, a `pattern`
must match the whole string) is kept: every output it admits still validates.
"""

from __future__ import annotations

from urllib.parse import unquote



class GrammarError(ValueError):
    """A constraint xgrammar cannot compile or would not enforce exactly (invalid JSON schema, regex or
    grammar; a keyword outside the allow-list below). Defined here, below structured.py, so that this
    module needs nothing from it; structured.py re-exports it."""

# Keywords that constrain nothing (annotations) or only hold definitions for $ref.
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "deprecated", "readOnly",
                         "writeOnly", "$schema", "contentEncoding", "contentMediaType", "$defs", "definitions"})
# Keywords enforced exactly, and the type a schema must name for them to be enforced.
STRING_KEYWORDS = frozenset({"minLength", "maxLength", "pattern", "format"})
NUMBER_KEYWORDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
ARRAY_KEYWORDS = frozenset({"items", "prefixItems", "minItems", "maxItems", "unevaluatedItems"})
OBJECT_KEYWORDS = frozenset({"properties", "required", "additionalProperties", "patternProperties",
                             "propertyNames", "minProperties", "maxProperties", "unevaluatedProperties"})
GENERAL_KEYWORDS = frozenset({"type", "enum", "const", "anyOf", "$ref"})
SUPPORTED = ANNOTATIONS | STRING_KEYWORDS | NUMBER_KEYWORDS | ARRAY_KEYWORDS | OBJECT_KEYWORDS | GENERAL_KEYWORDS \
    | {"multipleOf", "$id"}
# String formats xgrammar has a grammar for (the set vLLM's xgrammar backend accepts too).
FORMATS = frozenset({"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri",
                     "uri-reference", "uri-template", "json-pointer", "relative-json-pointer"})
_TYPES = {"string", "number", "integer", "boolean", "array", "object", "null"}
# Keywords whose value is one subschema, a list of them, or a map of name -> subschema.
_ONE = ("items", "additionalProperties", "propertyNames", "unevaluatedItems", "unevaluatedProperties")
_LIST = ("prefixItems", "anyOf")
_MAP = ("properties", "patternProperties", "$defs", "definitions")


class UnenforceableSchema(GrammarError):
    """A JSON schema keyword the grammar cannot enforce. `keyword` and `path` (a JSON pointer into the
    schema, "" for the root) name it; str() is the one-line reason."""

    def __init__(self, keyword: str, path: str, why: str):
        self.keyword, self.path = keyword, path
        super().__init__(f"JSON schema keyword '{keyword}' at {path or '/'} cannot be enforced: {why}")


def unenforceable(schema) -> UnenforceableSchema | None:
    """The first keyword of `schema` (a dict or bool) the grammar would not enforce exactly, else None."""
    try:
        _check(schema, schema, "")
    except UnenforceableSchema as exc:
        return exc
    return None


def check_enforceable(schema) -> None:
    """Raise UnenforceableSchema for the first keyword the grammar would not enforce exactly."""
    if (err := unenforceable(schema)) is not None:
        raise err


def _pointer(path: str, key) -> str:
    return f"{path}/{str(key).replace('~', '~0').replace('/', '~1')}"


def _types(node: dict) -> set[str]:
    t = node.get("type")
    return set(t) if isinstance(t, list) else {t} if isinstance(t, str) else set()


def _resolve(root, ref: str, path: str):
    target = root
    for part in ref[2:].split("/") if ref.startswith("#/") else []:
        part = unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and part in target:
            target = target[part]
        elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
        else:
            raise UnenforceableSchema("$ref", path, f"{ref!r} points to nothing in this schema")
    return target


def _check(root, node, path: str) -> None:
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        raise UnenforceableSchema("(schema)", path, f"a schema must be an object or a boolean, got {type(node).__name__}")
    for key in node:
        if key not in SUPPORTED:
            raise UnenforceableSchema(key, _pointer(path, key), "the grammar does not support it")
    if "$id" in node and path:
        raise UnenforceableSchema("$id", _pointer(path, "$id"), "only the root may set $id (it changes what a $ref resolves to)")
    constraints = set(node) - ANNOTATIONS - {"$id"}
    types = _types(node)
    unknown = types - _TYPES
    if unknown:
        raise UnenforceableSchema("type", _pointer(path, "type"), f"unknown type {sorted(unknown)[0]!r}")
    if "$ref" in node:
        ref = node["$ref"]
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise UnenforceableSchema("$ref", _pointer(path, "$ref"),
                                      f"{ref!r} is not a local reference ('#' or '#/$defs/Name')")
        _resolve(root, ref, _pointer(path, "$ref"))
        if constraints - {"$ref"}:
            extra = sorted(constraints - {"$ref"})[0]
            raise UnenforceableSchema(extra, _pointer(path, extra), "keywords beside a $ref are ignored by the grammar")
    if "anyOf" in node and constraints - {"anyOf"}:
        extra = sorted(constraints - {"anyOf"})[0]
        raise UnenforceableSchema(extra, _pointer(path, extra), "keywords beside anyOf are ignored by the grammar; "
                                  "move them into each branch")
    for key in ("enum", "const"):
        if key in node:
            if constraints - {key, "type"}:
                extra = sorted(constraints - {key, "type"})[0]
                raise UnenforceableSchema(extra, _pointer(path, extra), f"keywords beside {key} are ignored by the grammar")
            values = node[key] if key == "enum" else [node[key]]
            if key == "enum" and (not isinstance(values, list) or not values):
                raise UnenforceableSchema(key, _pointer(path, key), "enum must be a non-empty list")
            if types and any(not _is_type(v, types) for v in values):
                raise UnenforceableSchema(key, _pointer(path, key),
                                          f"a value is not of type {'/'.join(sorted(types))}, which the grammar does not check")
    for group, need in ((STRING_KEYWORDS, {"string"}), (NUMBER_KEYWORDS | {"multipleOf"}, {"integer", "number"})):
        for key in sorted(group & set(node)):
            if not types & need:
                raise UnenforceableSchema(key, _pointer(path, key),
                                          f"the grammar applies it only with \"type\": {' or '.join(sorted(need))}")
    if "multipleOf" in node and "number" in types:
        raise UnenforceableSchema("multipleOf", _pointer(path, "multipleOf"), "enforced for integers only, not numbers")
    if "format" in node and node["format"] not in FORMATS:
        raise UnenforceableSchema("format", _pointer(path, "format"),
                                  f"format {node['format']!r} is not one of {', '.join(sorted(FORMATS))}")
    if {"pattern", "format"} & set(node) and {"minLength", "maxLength"} & set(node):
        key = "minLength" if "minLength" in node else "maxLength"
        raise UnenforceableSchema(key, _pointer(path, key), "the grammar drops string lengths beside a pattern or format")
    for key in ("unevaluatedItems", "unevaluatedProperties"):
        if key in node and not isinstance(node[key], (bool, dict)):
            raise UnenforceableSchema(key, _pointer(path, key), "must be a schema")
    for key in _ONE:
        if key in node:
            _check(root, node[key], _pointer(path, key))
    for key in _LIST:
        if key in node:
            if not isinstance(node[key], list):
                raise UnenforceableSchema(key, _pointer(path, key), "must be a list of schemas")
            for i, sub in enumerate(node[key]):
                _check(root, sub, _pointer(_pointer(path, key), i))
    for key in _MAP:
        if key in node:
            if not isinstance(node[key], dict):
                raise UnenforceableSchema(key, _pointer(path, key), "must map names to schemas")
            for name, sub in node[key].items():
                _check(root, sub, _pointer(_pointer(path, key), name))


def _is_type(value, types: set[str]) -> bool:
    checks = {"string": lambda v: isinstance(v, str), "null": lambda v: v is None,
              "boolean": lambda v: isinstance(v, bool), "array": lambda v: isinstance(v, list),
              "object": lambda v: isinstance(v, dict),
              "integer": lambda v: isinstance(v, int) and not isinstance(v, bool)
              or isinstance(v, float) and v.is_integer(),
              "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)}
    return any(checks[t](value) for t in types)
