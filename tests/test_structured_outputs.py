"""Structured outputs on the default model (SmolLM2-135M-Instruct) sampling at temperature 1:
every JSON output parses and validates against its schema (jsonschema), alone, with n=3, under
preemption (recompute and swap), next to unconstrained requests that stay exactly as they were;
regex, choice and EBNF outputs match; the mask composes with the other logits processors;
grammars compile once per spec; bad specs are ValueErrors naming the field."""

from __future__ import annotations

import gc
import json
import re
import weakref

import jsonschema
import pytest

from engine import DEFAULT_MODEL, LLM, SamplingParams
from engine.structured_outputs import StructuredOutputsParams
from tests.test_engine_integrity import run as run_to_the_end
from tests.structured_schemas import SCHEMAS

pytestmark = pytest.mark.slow  # the default model: ~5 s to load, then a few seconds per test

SEEDS = (0, 1)
MAX_TOKENS = 120


@pytest.fixture(scope="module")
def llm():
    # The CPU's fastest dtype (bfloat16 where it has AMX / AVX512-BF16): these tests are about
    # what the grammar allows, which does not depend on it.
    return LLM(DEFAULT_MODEL, num_kv_blocks=1024)


def chat(name: str) -> list[dict]:
    return [{"role": "user", "content": f"Reply with a short JSON example of a {name.replace('_', ' ')}."}]


def json_params(schema: dict, seed: int, **kwargs) -> SamplingParams:
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    return SamplingParams(temperature=1.0, seed=seed, structured_outputs=StructuredOutputsParams(json=schema), **kwargs)


def assert_valid(text: str, schema: dict, finish_reason: str | None) -> None:
    assert finish_reason == "stop", (finish_reason, text)
    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def test_every_schema_validates_at_temperature_1(llm):
    assert len(SCHEMAS) >= 20
    cases = [(name, seed) for name in SCHEMAS for seed in SEEDS]
    outs = llm.chat([chat(name) for name, _ in cases], [json_params(SCHEMAS[name], seed) for name, seed in cases], use_tqdm=False)
    for (name, seed), out in zip(cases, outs):
        completion = out.outputs[0]
        assert_valid(completion.text, SCHEMAS[name], completion.finish_reason)
    # No free whitespace: JSON separators are ", " and ": " and nothing else between tokens.
    texts = [out.outputs[0].text for out in outs]
    assert not any("\n" in t or "  " in t.replace('"  ', "") for t in texts if not t.startswith('"')), texts


def test_n3_samples_fork_the_grammar_and_all_validate(llm):
    names = list(SCHEMAS)[:8]
    outs = llm.chat([chat(n) for n in names], [json_params(SCHEMAS[n], 7, n=3) for n in names], use_tqdm=False)
    distinct = 0
    for name, out in zip(names, outs):
        assert len(out.outputs) == 3
        for completion in out.outputs:
            assert_valid(completion.text, SCHEMAS[name], completion.finish_reason)
        distinct += len({c.text for c in out.outputs}) > 1
    assert distinct >= 4  # the samples went their own ways, each in its own grammar state


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_under_preemption(mode):
    # 16 blocks of 16 tokens for six requests, two of them with n=3: the grammar state of a
    # recomputed sequence is kept (its tokens are), a swapped one's goes nowhere.
    small = LLM(DEFAULT_MODEL, num_kv_blocks=16, preemption_mode=mode)
    names = ["flat_required", "enum_field", "int_array_bounds", "string_pattern", "number_bounds", "top_level_array"]
    params = [json_params(SCHEMAS[n], i, max_tokens=60, n=3 if i % 3 == 0 else 1) for i, n in enumerate(names)]
    outs = small.chat([chat(n) for n in names], params, use_tqdm=False)
    scheduler = small.engine.scheduler
    assert scheduler.num_preemptions > 0 and (scheduler.num_swap_outs > 0) == (mode == "swap")
    for name, out in zip(names, outs):
        for completion in out.outputs:
            assert_valid(completion.text, SCHEMAS[name], completion.finish_reason)


@pytest.fixture(scope="module")
def llm_float32(default_float32_llm):
    # Outputs that must not change with the batch around them: float32, the engine's exact mode
    # (bfloat16 through unpacked kernels, on CPUs without AVX512-BW, rounds by batch shape).
    return default_float32_llm


def test_unconstrained_neighbours_are_unchanged(llm_float32):
    llm = llm_float32
    prompts = [[{"role": "user", "content": q}] for q in ("Name a fruit.", "Count to five.", "What is rain?")]
    plain = [SamplingParams(temperature=1.0, seed=s, max_tokens=24) for s in range(3)]
    alone = llm.chat(prompts, plain, use_tqdm=False)
    names = list(SCHEMAS)[:6]
    mixed = llm.chat(prompts + [chat(n) for n in names], plain + [json_params(SCHEMAS[n], 3) for n in names], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == [o.outputs[0].token_ids for o in alone]
    for name, out in zip(names, mixed[3:]):
        assert_valid(out.outputs[0].text, SCHEMAS[name], out.outputs[0].finish_reason)


GRAMMARS = [
    ({"regex": r"[a-z]{3,8}@[a-z]{3,8}\.(com|org)"}, r"[a-z]{3,8}@[a-z]{3,8}\.(com|org)"),
    ({"regex": r"\d{3}-\d{4}"}, r"\d{3}-\d{4}"),
    ({"regex": r"(yes|no), because [a-z ]{1,20}\."}, r"(yes|no), because [a-z ]{1,20}\."),
    ({"choice": ["Paris", "London", "Tokyo \"東京\""]}, r'Paris|London|Tokyo "東京"'),
    ({"choice": ["positive", "negative", "neutral"]}, r"positive|negative|neutral"),
    ({"grammar": 'root ::= num " " op " " num\nop ::= "+" | "-" | "*"\nnum ::= [1-9] [0-9]?'}, r"[1-9][0-9]? [+*-] [1-9][0-9]?"),
    ({"grammar": 'root ::= "[" item ("," item)? ("," item)? "]"\nitem ::= "a" | "bb" | "ccc"'}, r"\[(a|bb|ccc)(,(a|bb|ccc)){0,2}\]"),
]


@pytest.mark.parametrize("spec, pattern", GRAMMARS)
def test_regex_choice_and_ebnf_outputs_match(llm, spec, pattern):
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=40, structured_outputs=spec) for s in range(4)]
    outs = llm.generate(["Answer:"] * 4, params, use_tqdm=False)
    for out in outs:
        assert out.outputs[0].finish_reason == "stop" and re.fullmatch(pattern, out.outputs[0].text), out.outputs[0].text


def test_mask_composes_with_logit_bias_penalties_and_truncation(llm):
    tokenizer = llm.get_tokenizer()
    yes, no = tokenizer.encode("yes", add_special_tokens=False)[0], tokenizer.encode("no", add_special_tokens=False)[0]
    choice = {"choice": ["yes", "no"]}
    every = dict(temperature=1.0, top_k=5, top_p=0.9, min_p=0.01, presence_penalty=1.0, frequency_penalty=0.5,
                 repetition_penalty=1.3, max_tokens=8, structured_outputs=choice)  # fmt: skip
    # A huge bias on a token the grammar forbids cannot make it possible...
    forbidden = tokenizer.encode(" maybe", add_special_tokens=False)[0]
    outs = llm.generate(["Is it?"] * 4, [SamplingParams(seed=s, logit_bias={forbidden: 100}, **every) for s in range(4)], use_tqdm=False)
    assert all(o.outputs[0].text in ("yes", "no") for o in outs)
    # ...while a bias between allowed tokens still decides.
    for bias, want in (({no: 100}, "no"), ({yes: 100}, "yes")):
        outs = llm.generate(["Is it?"] * 4, [SamplingParams(seed=s, logit_bias=bias, **every) for s in range(4)], use_tqdm=False)
        assert [o.outputs[0].text for o in outs] == [want] * 4


def test_stop_strings_and_ignore_eos_end_cleanly(llm):
    schema = SCHEMAS["flat_required"]
    out = llm.chat(chat("person"), json_params(schema, 0, stop=['"age"']), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == '"age"' and out.text.startswith('{"name": ')
    # ignore_eos: the grammar's end (its EOS accepted) still ends the sequence.
    out = llm.chat(chat("person"), json_params(schema, 0, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), schema)


def test_grammars_compile_once_per_spec_and_are_freed_with_the_request(llm):
    engine = llm.engine
    a = engine.grammars.submit(StructuredOutputsParams(json=SCHEMAS["flat_required"]))
    b = engine.grammars.submit(StructuredOutputsParams(json=json.dumps(SCHEMAS["flat_required"])))
    assert a is b and a.result() is not None
    params = json_params(SCHEMAS["typed_map"], 0, n=2)
    group = engine.add_request("aborted", llm.get_tokenizer().encode("Reply with JSON:"), params)
    group.grammar_future.result()
    for _ in range(3):
        engine.step()
    states = [weakref.ref(seq.grammar) for seq in group.seqs]
    assert len(states) == 2 and all(s() is not None for s in states)
    engine.abort_request("aborted")
    del group
    gc.collect()
    assert all(s() is None for s in states)


def test_bad_specs_are_value_errors_naming_the_field(llm):
    bad = [
        ({"json": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
        ({"json": {"type": "object", "properties": {"a": {"oneOf": [{"type": "integer"}]}}}}, r"oneOf.*\$\.properties\.a"),
        ({"json": {"type": "string", "format": "color"}}, "format 'color'"),
        ({"json": {"type": "string", "pattern": "^a+$", "maxLength": 3}}, "maxLength together with pattern"),
        ({"json": "{not json"}, "not valid JSON"),
        ({"regex": "a", "choice": ["b"]}, "exactly one"),
        ({"choice": []}, "non-empty list"),
        ({"colour": "red"}, "unknown field"),
    ]
    for spec, message in bad:
        with pytest.raises(ValueError, match=rf"SamplingParams\.structured_outputs.*{message}"):
            SamplingParams(structured_outputs=spec)
    with pytest.raises(ValueError, match="structured_outputs is not supported with beam search"):
        SamplingParams(temperature=0, use_beam_search=True, n=2, structured_outputs={"regex": "a+"})
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured_outputs={"regex": "a+"})
    # What only the library can find: at generate time, before anything is queued.
    for spec in ({"regex": "(("}, {"grammar": "root ::= undefined_rule"}, {"json": {"$ref": "#/$defs/missing"}}):
        with pytest.raises(ValueError, match="structured_outputs .* cannot be compiled"):
            llm.generate(["x", "y"], [SamplingParams(), SamplingParams(structured_outputs=spec)], use_tqdm=False)
        assert not llm.engine.has_unfinished_requests()


def test_a_request_waits_for_its_grammar_while_the_engine_runs_others(llm):
    engine, tokenizer = llm.engine, llm.get_tokenizer()
    ids = tokenizer.encode("Answer:")
    engine.add_request("plain", ids, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    fresh = {"regex": r"[0-9]{2}x[0-9]{2}"}  # compiled by nothing before: its future may still run
    engine.add_request("fresh", ids, SamplingParams(temperature=1.0, seed=0, max_tokens=12, structured_outputs=fresh))
    broken = {"grammar": "root ::= nowhere"}
    engine.add_request("broken", ids, SamplingParams(structured_outputs=broken))
    assert {"fresh", "broken"} <= set(engine.compiling)  # parked until a step sees them compiled
    finals, errors = run_to_the_end(engine, {})
    assert set(errors) == {"broken"} and "cannot be compiled" in str(errors["broken"])
    assert len(finals["plain"].outputs[0].token_ids) == 6
    assert re.fullmatch(r"[0-9]{2}x[0-9]{2}", finals["fresh"].outputs[0].text)
