"""JSON schemas are enforced exactly or refused: each refused keyword is shown to be dropped by xgrammar
itself (it admits an instance the schema rejects), each allowed one to be enforced by xgrammar's matcher,
and outputs generated under allowed schemas validate with jsonschema; the endpoint answers 400 naming the
keyword; synthesis refuses at preflight."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from ctxforge.schema_keywords import unenforceable
from ctxforge.structured import GrammarError, Grammars
from routes_app import routes_app

FMT = jsonschema.Draft202012Validator.FORMAT_CHECKER
INT = {"type": "integer"}
DEFS = {"X": INT}

# name: (schema, refused keyword, its path, an instance the schema rejects that raw xgrammar admits or None)
REFUSED = {
    "uniqueItems": ({"type": "array", "items": INT, "uniqueItems": True}, "uniqueItems", "/uniqueItems", [1, 1]),
    "not": ({"type": "integer", "not": {"const": 3}}, "not", "/not", 3),
    "allOf": ({"allOf": [INT, {"minimum": 3}]}, "allOf", "/allOf", 2),
    "oneOf": ({"oneOf": [INT, {"type": "number"}]}, "oneOf", "/oneOf", 1),
    "if": ({"type": "integer", "if": {"minimum": 5}, "then": {"maximum": 7}}, "if", "/if", 9),
    "contains": ({"type": "array", "items": INT, "contains": {"const": 5}}, "contains", "/contains", [1]),
    "dependentRequired": ({"type": "object", "properties": {"a": INT, "b": INT}, "dependentRequired": {"a": ["b"]}},
                          "dependentRequired", "/dependentRequired", {"a": 1}),
    "ref-not-local": ({"type": "array", "items": {"$ref": "/$defs/X"}, "$defs": DEFS}, "$ref", "/items/$ref", ["s"]),
    "ref-with-sibling": ({"$defs": DEFS, "type": "array", "items": {"$ref": "#/$defs/X", "minimum": 3}},
                         "minimum", "/items/minimum", [1]),
    "ref-missing": ({"type": "array", "items": {"$ref": "#/$defs/Nope"}}, "$ref", "/items/$ref", None),
    "ref-to-anchor": ({"$defs": {"X": {"$anchor": "x", "type": "integer"}}, "type": "array", "items": {"$ref": "#x"}},
                      "$ref", "/items/$ref", ["s"]),
    "anchor": ({"$defs": {"X": {"$anchor": "x", "type": "integer"}}, "$ref": "#/$defs/X"}, "$anchor", "/$defs/X/$anchor", None),
    "nested-id": ({"$defs": {"X": {"$id": "http://a/x", "type": "integer"}}, "$ref": "#/$defs/X"},
                  "$id", "/$defs/X/$id", None),
    "anyOf-with-sibling": ({"type": "object", "properties": {"a": INT}, "required": ["a"],
                            "anyOf": [{"properties": {"a": {"minimum": 5}}}]}, "properties", "/properties", {"a": 1}),
    "untyped-maxLength": ({"maxLength": 2}, "maxLength", "/maxLength", "abc"),
    "untyped-minimum": ({"minimum": 3}, "minimum", "/minimum", 1),
    "number-multipleOf": ({"type": "number", "multipleOf": 0.5}, "multipleOf", "/multipleOf", 1.3),
    "format-regex": ({"type": "string", "format": "regex"}, "format", "/format", "("),
    "pattern-with-maxLength": ({"type": "string", "pattern": "^a+$", "maxLength": 2}, "maxLength", "/maxLength", "aaa"),
    "enum-off-type": ({"type": "string", "enum": ["a", 1]}, "enum", "/enum", 1),
    "typo": ({"type": "string", "maxLenght": 2}, "maxLenght", "/maxLenght", None),
}

# name: (schema, instances it accepts, instances it rejects)
SUPPORTED = {
    "enum": ({"enum": ["a", 1]}, ["a", 1], ["b", 2]),
    "const": ({"const": "x"}, ["x"], ["y"]),
    "type-list": ({"type": ["string", "null"], "maxLength": 2}, ["ab", None], ["abc", 1]),
    "string-lengths": ({"type": "string", "minLength": 2, "maxLength": 3}, ["ab"], ["a", "abcd"]),
    "pattern": ({"type": "string", "pattern": "^a+$"}, ["aa"], ["b"]),
    "format-date": ({"type": "string", "format": "date"}, ["2020-01-02"], ["x"]),
    "format-email": ({"type": "string", "format": "email"}, ["a@b.co"], ["x"]),
    "integer-bounds": ({"type": "integer", "minimum": 3, "exclusiveMaximum": 6}, [3, 5], [2, 6]),
    "number-bounds": ({"type": "number", "exclusiveMinimum": 1.5, "maximum": 2}, [1.6, 2], [1.5, 2.1]),
    "integer-multipleOf": ({"type": "integer", "multipleOf": 3}, [6], [7]),
    "items": ({"type": "array", "items": INT, "minItems": 1, "maxItems": 2}, [[1], [1, 2]], [[], [1, 2, 3], ["s"]]),
    "prefixItems": ({"type": "array", "prefixItems": [INT], "items": False}, [[1]], [["s"], [1, 2]]),
    "object": ({"type": "object", "properties": {"a": INT}, "required": ["a"], "additionalProperties": False},
               [{"a": 1}], [{}, {"a": "s"}, {"a": 1, "b": 2}]),
    "additionalProperties": ({"type": "object", "additionalProperties": INT, "maxProperties": 1},
                             [{"b": 1}], [{"b": "s"}, {"a": 1, "b": 2}]),
    "patternProperties": ({"type": "object", "patternProperties": {"^x": INT}}, [{"x": 1}], [{"x": "s"}]),
    "anyOf": ({"anyOf": [INT, {"type": "string", "maxLength": 1}]}, [1, "a"], [None, "ab"]),
    "ref-defs": ({"$defs": DEFS, "type": "object", "properties": {"a": {"$ref": "#/$defs/X"}}, "required": ["a"]},
                 [{"a": 1}], [{"a": "s"}, {}]),
    "ref-definitions": ({"definitions": DEFS, "type": "array", "items": {"$ref": "#/definitions/X"}}, [[1]], [["s"]]),
    "ref-recursive": ({"$defs": {"N": {"type": "object", "properties": {"n": {"anyOf": [{"$ref": "#/$defs/N"}, {"type": "null"}]}},
                                       "required": ["n"]}}, "$ref": "#/$defs/N"},
                      [{"n": None}, {"n": {"n": None}}], [{"n": 1}]),
    "annotations": ({"type": "integer", "title": "t", "description": "d", "default": 1, "examples": [1],
                     "$schema": "https://json-schema.org/draft/2020-12/schema"}, [1], ["a"]),
}


@pytest.fixture(scope="module")
def tiny_model(tiny_model_path):
    from ctxforge.models import load_causal_lm

    model, tok, _ = load_causal_lm(tiny_model_path, "cpu", "float32")
    return model, tok


@pytest.fixture(scope="module")
def grammars(tiny_model):
    model, tok = tiny_model
    return Grammars(tok, vocab_size=model.config.vocab_size)  # built once: the vocabulary scan takes seconds


def _admits(compiled, instance) -> bool:
    """The compiled grammar takes the whole instance and may end there (its stop token is accepted)."""
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(compiled)
    return matcher.accept_string(json.dumps(instance)) and matcher.accept_token(matcher.stop_token_ids[0])


def _raw_accepts(schema, instance) -> bool:
    """What xgrammar alone admits (no allow-list): its grammar for the schema accepts the instance."""
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string

    return _is_grammar_accept_string(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False),
                                     json.dumps(instance))


@pytest.mark.parametrize("name", REFUSED)
def test_a_keyword_the_grammar_drops_is_refused_by_name_and_path(name, grammars):
    schema, keyword, path, widened = REFUSED[name]
    err = unenforceable(schema)
    assert err is not None and (err.keyword, err.path) == (keyword, path), (name, err)
    assert f"'{keyword}'" in str(err) and path in str(err)
    with pytest.raises(GrammarError, match=f"'{keyword.replace('$', '[$]')}'"):
        grammars.json_schema(schema)
    if widened is not None:  # why it is refused: xgrammar admits an instance the schema rejects
        try:
            valid = jsonschema.Draft202012Validator(schema, format_checker=FMT).is_valid(widened)
        except jsonschema.exceptions._WrappedReferencingError:
            valid = False  # a reference that resolves to nothing validates no instance
        assert not valid
        assert _raw_accepts(schema, widened), f"xgrammar now enforces {name}: move it to the allow-list"


@pytest.mark.parametrize("name", SUPPORTED)
def test_an_allowed_keyword_is_enforced_by_the_grammar(name, grammars):
    schema, good, bad = SUPPORTED[name]
    assert unenforceable(schema) is None
    compiled = grammars.json_schema(schema)
    check = jsonschema.Draft202012Validator(schema, format_checker=FMT)
    for instance in good:
        assert check.is_valid(instance)
        assert _admits(compiled, instance), (name, instance)
    for instance in bad:  # negative controls: the schema and the grammar both reject them
        assert not check.is_valid(instance)
        assert not _admits(compiled, instance), (name, instance)


GENERATED = {  # every string, array and number bounded, so a random model finishes within the budget
    "ref-defs": {"$defs": {"Name": {"type": "string", "minLength": 1, "maxLength": 4}}, "type": "object",
                 "properties": {"who": {"$ref": "#/$defs/Name"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
                 "required": ["who", "n"], "additionalProperties": False},
    "enum-anyOf": {"type": "object", "properties": {"k": {"enum": ["yes", "no"]},
                                                    "v": {"anyOf": [{"type": "null"}, {"type": "boolean"}]}},
                   "required": ["k", "v"], "additionalProperties": False},
    "array": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 3}, "minItems": 1, "maxItems": 3},
}


def test_outputs_generated_under_allowed_schemas_validate(tiny_model, grammars):
    import torch

    model, tok = tiny_model
    prompt = tok("Answer in JSON:", return_tensors="pt").input_ids
    for seed, schema in enumerate(GENERATED.values()):
        torch.manual_seed(seed)
        out = model.generate(prompt, max_new_tokens=48, do_sample=True, temperature=1.0,
                             logits_processor=[grammars.logits_processor(grammars.json_schema(schema))],
                             pad_token_id=tok.eos_token_id)
        text = tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
        jsonschema.validate(json.loads(text), schema)  # raises on a violation: the test fails


def _routes_app(engine):
    return routes_app(engine)


@pytest.mark.anyio
async def test_the_endpoint_refuses_an_unenforceable_strict_schema_and_enforces_a_defs_reference(tiny_model_path):
    from ctxforge.serve.served_model import HFServedModel

    app = _routes_app(HFServedModel(tiny_model_path, "tiny", 512, device="cpu"))
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "temperature": 0}

    def fmt(schema):
        return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for schema, keyword in ((REFUSED["uniqueItems"][0], "uniqueItems"), (REFUSED["not"][0], "not"),
                                (REFUSED["ref-not-local"][0], "$ref")):
            r = await c.post("/v1/chat/completions", json=dict(body, response_format=fmt(schema)))
            assert r.status_code == 400 and f"'{keyword}'" in r.json()["error"]["message"], r.text
            assert r.json()["error"]["param"].startswith("response_format")
        schema = GENERATED["ref-defs"]
        r = await c.post("/v1/chat/completions", json=dict(body, response_format=fmt(schema)))
        assert r.status_code == 200, r.text
        jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), schema)


def test_every_schema_ctxforge_sends_is_enforced_exactly():
    from ctxforge.lengthen import prompts as lengthen
    from ctxforge.serve.longbench_chat import rating_schema

    for schema in (lengthen.instruction_schema(200), lengthen.JUDGE_SCHEMA, rating_schema(300)):
        assert unenforceable(schema) is None, schema
