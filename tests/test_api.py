"""The offline LLM API and the online AsyncEngine, as users call them."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from engine import LLM, AsyncEngine, EngineConfig, SamplingParams
from engine import async_engine as async_engine_module
from engine import config as config_module
from engine.outputs import RequestOutput
from engine.request_streams import RequestStream
from engine.settings import engine_config_from_env
from tests.conftest import assert_all_blocks_free
from tests.helpers import fail_detokenizing_the_doomed_prompt


@pytest.fixture(scope="module")
def llm(tiny_path):
    return LLM(tiny_path, num_kv_blocks=128)


def test_generate_returns_vllm_shaped_outputs_in_prompt_order(llm):
    prompts = ["first prompt", "second, longer prompt here", "third"]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    for out in outs:
        assert out.finished
        assert out.prompt_token_ids == llm.get_tokenizer().encode(out.prompt)
        completion = out.outputs[0]
        assert len(completion.token_ids) == 5 and completion.finish_reason == "length"
        assert completion.text == llm.get_tokenizer().decode(completion.token_ids, skip_special_tokens=True)


def test_generate_accepts_token_ids_and_per_prompt_params(llm):
    outs = llm.generate(
        [[1, 2, 3], [4, 5]],
        [SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
         SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)],
        use_tqdm=False,
    )
    assert [o.prompt for o in outs] == [None, None]
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 3]


def test_each_steps_output_keeps_the_tokens_and_logprobs_it_had_when_made(llm):
    """Outputs are cumulative snapshots: one kept from an early step still holds that step's tokens
    and logprobs after the request went on, though a step copies them only when they are first
    read (CompletionOutput.of_sequence_lists: the copy grows with the output, and most outputs are
    never read)."""
    engine = llm.engine
    engine.add_request("snapshots", "snapshots of a growing output", SamplingParams(max_tokens=6, ignore_eos=True, logprobs=1))
    kept = []
    while engine.has_unfinished_requests():
        kept += [out.outputs[0] for out in engine.step()]
    assert len(kept) == 6
    # A stream's reader counts the tokens and takes the new ones' logprobs: copying only those.
    assert [c.num_token_ids for c in kept] == [1, 2, 3, 4, 5, 6]
    third = kept[2]
    since_one = (third.token_ids_since(1), third.logprobs_since(1))
    assert all("token_ids" not in vars(c) and "logprobs" not in vars(c) for c in kept)  # nothing copied yet
    assert since_one == (kept[-1].token_ids[1:3], kept[-1].logprobs[1:3])
    final = kept[-1]
    assert [c.token_ids for c in kept] == [final.token_ids[: k + 1] for k in range(6)]
    assert [c.logprobs for c in kept] == [final.logprobs[: k + 1] for k in range(6)]
    assert kept[0].token_ids is kept[0].token_ids  # copied once, on the first read
    assert (third.num_token_ids, third.token_ids_since(1), third.logprobs_since(1)) == (3, *since_one)
    assert_all_blocks_free(engine)


def test_chat_applies_the_models_chat_template(llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    expected = llm.get_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert llm.get_tokenizer().decode(out.prompt_token_ids) == expected
    assert expected.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda llm: llm.generate("", use_tqdm=False), "prompt is empty"),
        (lambda llm: llm.generate([[]], use_tqdm=False), "prompt is empty"),
        (lambda llm: llm.generate("x" * 3000, use_tqdm=False), r"prompt has \d+ tokens, but max_model_len is 512"),
        (lambda llm: llm.generate([[10**9]], use_tqdm=False), "token ids must be integers"),
        (lambda llm: llm.generate([], use_tqdm=False), "prompts is empty"),
        (lambda llm: llm.generate(["a", "b"], [SamplingParams()] * 3, use_tqdm=False), "3 SamplingParams for 2"),
        (lambda llm: llm.generate("ok", SamplingParams(max_tokens=0)), r"max_tokens must be at least 1"),
        (lambda llm: llm.generate("ok", SamplingParams(temperature=-1)), r"temperature must be non-negative"),
    ],
)
def test_bad_input_raises_value_error_saying_what_to_change(llm, call, message):
    with pytest.raises(ValueError, match=message):
        call(llm)
    assert not llm.engine.has_unfinished_requests()


def test_a_bad_prompt_in_a_batch_queues_nothing(llm):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate(["fine", ""], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(model="no-such-model"), "no such directory or file, nor a known model name"),
        (dict(model="x", block_size=12), "block_size must be one of"),
        (dict(model="x", attention_backend="cuda-magic"), "attention_backend must be"),
        (dict(model="x", num_kv_blocks=0), "num_kv_blocks must be at least 1"),
        (dict(model="x", max_num_batched_tokens=4), "max_num_batched_tokens must be at least block_size"),
        (dict(model="x", dtype="float8"), "dtype must be"),
    ],
)
def test_bad_engine_settings_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(**kwargs)


def test_max_model_len_beyond_the_model_is_refused(tiny_path):
    with pytest.raises(ValueError, match="max_model_len=4096 exceeds"):
        LLM(tiny_path, max_model_len=4096)


@pytest.mark.parametrize(
    "native_bf16, checkpoint, expected",
    [
        (True, None, torch.bfloat16),  # a quantized GGUF (the default model) on an AMX CPU
        (True, torch.bfloat16, torch.bfloat16),
        (True, torch.float16, torch.bfloat16),
        (True, torch.float32, torch.float32),  # float32 checkpoints stay exact
        (False, None, torch.float32),  # emulated bfloat16 would be slower than float32
        (False, torch.bfloat16, torch.float32),
    ],
)
def test_auto_dtype_on_cpu_is_bfloat16_only_where_the_cpu_computes_it_natively(monkeypatch, native_bf16, checkpoint, expected):
    monkeypatch.setattr(config_module, "cpu_has_native_bfloat16", lambda: native_bf16)
    assert EngineConfig(model="m", device="cpu").torch_dtype(checkpoint) == expected
    assert EngineConfig(model="m", device="cpu", dtype="float32").torch_dtype(checkpoint) == torch.float32


def test_the_engine_runs_a_float32_checkpoint_in_float32(tiny_path):
    assert LLM(tiny_path, num_kv_blocks=16).engine.runner.dtype == torch.float32


def test_engine_config_reads_environment_settings(monkeypatch):
    monkeypatch.setenv("BENTO_LLM_NUM_KV_BLOCKS", "77")
    monkeypatch.setenv("BENTO_LLM_DTYPE", "float32")
    config = engine_config_from_env(model="m")
    assert (config.num_kv_blocks, config.dtype, config.model) == (77, "float32", "m")
    monkeypatch.setenv("BENTO_LLM_MAX_NUM_SEQS", "many")
    with pytest.raises(ValueError, match="max_num_seqs.*'many'"):
        engine_config_from_env()


# ---- AsyncEngine ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def async_engine(tiny_path):
    engine = AsyncEngine(EngineConfig(model=tiny_path, num_kv_blocks=64))
    yield engine
    asyncio.run(engine.shutdown())


async def collect(stream):
    return [out async for out in stream]


def test_async_engine_loads_the_model_on_the_thread_that_runs_the_steps(tiny_path, monkeypatch):
    """One thread runs every torch op: a second OpenMP master (the loading thread) makes
    libgomp's workers sleep between parallel regions (steps measured 20-30% slower). It has its
    name in the OS too, so that its CPU time (and its OpenMP workers') can be told apart."""
    from engine.llm_engine import LLMEngine

    threads = {}
    original_init, original_step = LLMEngine.__init__, LLMEngine.step

    def init(self, *args, **kwargs):
        threads["built"] = threading.get_ident()
        original_init(self, *args, **kwargs)

    def step(self):
        threads.setdefault("stepped", threading.get_ident())
        if sys.platform == "linux":  # named in the OS too, for per-thread CPU accounting (and its OpenMP workers)
            threads.setdefault("os_name", Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip())
        return original_step(self)

    monkeypatch.setattr(LLMEngine, "__init__", init)
    monkeypatch.setattr(LLMEngine, "step", step)
    engine = AsyncEngine(EngineConfig(model=tiny_path, num_kv_blocks=16))

    async def main():
        await collect(engine.add_request("t", "which thread", SamplingParams(max_tokens=2)))
        await engine.shutdown()

    asyncio.run(main())
    assert threads["built"] == threads["stepped"] != threading.get_ident()
    assert threads.get("os_name", "bento-llm-engin") == "bento-llm-engin"  # the OS keeps 15 characters


def test_async_engine_raises_a_bad_setting_in_the_constructor(tiny_path):
    before = threading.active_count()
    with pytest.raises(ValueError, match="max_model_len=4096 exceeds"):
        AsyncEngine(EngineConfig(model=tiny_path, max_model_len=4096))
    assert threading.active_count() == before  # no loop thread left behind


def test_async_stream_yields_growing_outputs_until_finished(async_engine, llm):
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    async def main():
        return await collect(async_engine.add_request("s1", "streaming test", params))

    items = asyncio.run(main())
    counts = [len(i.outputs[0].token_ids) for i in items]
    # One output per step, unless the reader lagged: then it gets the newest (outputs are cumulative).
    assert counts == sorted(set(counts)) and counts[-1] == 8
    assert [i.finished for i in items] == [False] * (len(items) - 1) + [True]
    offline = llm.generate("streaming test", params, use_tqdm=False)[0].outputs[0]
    assert items[-1].outputs[0].token_ids == offline.token_ids
    assert items[-1].outputs[0].text == offline.text
    assert items[-1].metrics.first_token_time <= items[-1].metrics.finished_time


def test_a_lagging_reader_gets_the_newest_output_with_every_token_since(async_engine, llm):
    """Outputs are cumulative, so a stream whose reader falls behind the engine holds only the
    newest: the reader catches up in one read (the server then sends those tokens in one chunk)."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    async def main():
        stream = async_engine.add_request("lagging", "a reader that falls behind", params)
        first = await stream.__anext__()
        while async_engine.engine.has_unfinished_requests():  # the event loop is busy elsewhere
            time.sleep(0.005)
        return [first] + await collect(stream)

    items = asyncio.run(main())
    assert len(items) == 2 and [len(i.outputs[0].token_ids) for i in items] == [1, 8] and items[1].finished
    offline = llm.generate("a reader that falls behind", params, use_tqdm=False)[0].outputs[0]
    assert (items[1].outputs[0].token_ids, items[1].outputs[0].text) == (offline.token_ids, offline.text)


def handed_over(monkeypatch, request_id: str) -> list[int]:
    """The token counts of the outputs the step loop hands request_id's reader, as it hands them
    (whether the reader keeps up or not)."""
    counts: list[int] = []
    push = RequestStream.push

    def recording(self, item):
        if isinstance(item, RequestOutput) and item.request_id == request_id:
            counts.append(len(item.outputs[0].token_ids))
        push(self, item)

    monkeypatch.setattr(RequestStream, "push", recording)
    return counts


def test_a_stream_is_handed_an_output_every_stream_interval_tokens(tiny_path, llm, monkeypatch):
    """vLLM's stream_interval: the first token at once, then every 3 tokens, the last always;
    each output is cumulative, so the reader still gets every token."""
    engine = AsyncEngine(EngineConfig(model=tiny_path, num_kv_blocks=16, stream_interval=3))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    counts = handed_over(monkeypatch, "every3")

    async def main():
        return await collect(engine.add_request("every3", "three at a time", params))

    try:
        items = asyncio.run(main())
        assert_all_blocks_free(engine.engine)
    finally:
        asyncio.run(engine.shutdown())
    assert counts == [1, 4, 7, 8]
    assert {len(i.outputs[0].token_ids) for i in items} <= {1, 4, 7, 8} and items[-1].finished
    offline = llm.generate("three at a time", params, use_tqdm=False)[0].outputs[0]
    assert (items[-1].outputs[0].token_ids, items[-1].outputs[0].text) == (offline.token_ids, offline.text)


def test_a_reader_that_wants_only_the_final_output_is_handed_the_first_and_the_last(async_engine, monkeypatch):
    """A non-streaming HTTP request (stream=False) reads only its final output; the first is
    handed over too, for the time-to-first-token metric. The step loop does not wake its reader
    for the steps between."""
    assert async_engine.config.stream_interval == 1
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    counts = handed_over(monkeypatch, "final")
    streamed = handed_over(monkeypatch, "each")

    async def main():
        return await asyncio.gather(collect(async_engine.add_request("final", "only the end", params, stream=False)),
                                    collect(async_engine.add_request("each", "only the end", params)))

    final, each = asyncio.run(main())
    assert counts == [1, 8] and final[-1].finished and len(final[-1].outputs[0].token_ids) == 8
    assert streamed == list(range(1, 9))  # a streamed request beside it: every token
    assert final[-1].outputs[0].token_ids == each[-1].outputs[0].token_ids
    assert_all_blocks_free(async_engine.engine)


def test_a_step_wakes_the_event_loop_once_for_all_its_requests(async_engine):
    """Each wake-up of the event loop from the engine thread is a context switch that takes a
    core from the step; a step's outputs for every request go over in one."""
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    steps = {"n": 0}
    step = async_engine.engine.step

    def counted_step():
        steps["n"] += 1
        return step()

    async def main():
        loop = asyncio.get_running_loop()
        wakeups = {"n": 0}
        call_soon_threadsafe = loop.call_soon_threadsafe

        def counted(*args, **kwargs):
            wakeups["n"] += 1
            return call_soon_threadsafe(*args, **kwargs)

        loop.call_soon_threadsafe = counted
        async_engine.engine.step = counted_step
        try:
            streams = [async_engine.add_request(f"w{i}", f"wake-up {i}", params) for i in range(8)]
            results = await asyncio.gather(*(collect(s) for s in streams))
        finally:
            del async_engine.engine.step
        return results, wakeups["n"]

    results, wakeups = asyncio.run(main())
    assert all(r[-1].finished and len(r[-1].outputs[0].token_ids) == 6 for r in results)
    assert 6 <= wakeups <= steps["n"]  # per request it would be at least 8 x 6


def test_the_next_step_waits_until_the_event_loop_has_handled_this_ones_outputs(async_engine, monkeypatch):
    """The readers' Python runs between steps, not during one, where every op would have to take
    the GIL back from it while the other OpenMP threads wait at the op's barrier. The wait is
    bounded (a busy event loop must not stall the engine: see the lagging-reader tests); here
    the bound is long, so a reader that blocks its loop shows the engine not stepping on."""
    if async_engine.engine.config.device == "cpu":
        assert async_engine._handoff_wait_s == async_engine_module._MAX_HANDOFF_WAIT_S  # a CPU engine waits
    monkeypatch.setattr(async_engine, "_handoff_wait_s", 5.0)
    steps = []
    step = async_engine.engine.step
    monkeypatch.setattr(async_engine.engine, "step", lambda: steps.append(1) or step())

    async def main():
        stepped_while_reading = []
        async for _ in async_engine.add_request("handoff", "wait for me", SamplingParams(max_tokens=4, ignore_eos=True)):
            before, deadline = len(steps), time.monotonic() + 0.2
            while len(steps) == before and time.monotonic() < deadline:
                time.sleep(0.01)  # blocks the event loop: an engine that did not wait would step on
            stepped_while_reading.append(len(steps) - before)
        return stepped_while_reading

    waited = async_engine.stats().step_handoff_seconds
    assert asyncio.run(main()) == [0, 0, 0, 0]
    # The wait is counted (bento_llm:step_handoff_seconds): each of the 4 outputs held the engine ~0.2 s.
    assert 0.6 <= async_engine.stats().step_handoff_seconds - waited < 5.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a GPU engine's hand-off: needs a GPU")
def test_on_a_gpu_the_next_step_does_not_wait_for_the_event_loop(tiny_path):
    """On a GPU the step does not share the readers' cores: waiting for them only idled the card
    (17-27% of a served run on an H200), so a reader that blocks its loop does not hold the engine."""
    engine = AsyncEngine(EngineConfig(model=tiny_path, num_kv_blocks=64, device="cuda"))
    steps = []
    step = engine.engine.step
    engine.engine.step = lambda: steps.append(1) or step()

    async def main():
        finished_while_reading = []
        async for _ in engine.add_request("no-wait", "step on", SamplingParams(max_tokens=8, ignore_eos=True)):
            if not finished_while_reading:
                time.sleep(0.3)  # blocks the event loop: a waiting engine would hold each step 20 ms
                finished_while_reading.append(not engine.engine.has_unfinished_requests())
        return finished_while_reading

    try:
        assert engine._handoff_wait_s == 0.0
        assert asyncio.run(main()) == [True]  # every other step of the request ran while the loop was blocked
        assert len(steps) >= 8
        assert engine.stats().step_handoff_seconds < 0.01
        assert_all_blocks_free(engine.engine)
    finally:
        asyncio.run(engine.shutdown())


def test_one_failing_request_ends_its_stream_with_its_error_and_the_others_finish(async_engine, monkeypatch):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    fail_detokenizing_the_doomed_prompt(async_engine.engine, monkeypatch)

    async def run(prompt):
        try:
            return await collect(async_engine.add_request(prompt, prompt, params))
        except RuntimeError as e:
            return e

    async def main():
        return await asyncio.gather(*(run(p) for p in ["first prompt", "the doomed prompt", "third prompt"]))

    first, doomed, third = asyncio.run(main())
    assert isinstance(doomed, RuntimeError) and "injected detokenizer failure" in str(doomed)
    assert [len(r[-1].outputs[0].token_ids) for r in (first, third)] == [6, 6]
    assert_all_blocks_free(async_engine.engine)


def test_async_concurrent_requests_all_complete(async_engine):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    async def main():
        streams = [async_engine.add_request(f"c{i}", f"concurrent {i}", params) for i in range(8)]
        return await asyncio.gather(*(collect(s) for s in streams))

    results = asyncio.run(main())
    assert all(r[-1].finished and len(r[-1].outputs[0].token_ids) == 6 for r in results)
    assert_all_blocks_free(async_engine.engine)


def test_async_abort_and_leaving_the_stream_free_blocks(async_engine):
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main():
        stream = async_engine.add_request("leave", "a long generation", params)
        async for out in stream:
            if len(out.outputs[0].token_ids) >= 3:
                break
        await stream.aclose()  # what a disconnecting client's handler does
        stream2 = async_engine.add_request("abort", "another long one", params)
        first = await stream2.__anext__()
        async_engine.abort("abort")
        await stream2.aclose()
        for _ in range(100):  # the engine frees them before its next step
            if async_engine.stats().num_kv_blocks_used == 0 and async_engine.stats().num_running == 0:
                return first
            await asyncio.sleep(0.02)
        raise AssertionError(f"blocks not freed: {async_engine.stats()}")

    first = asyncio.run(main())
    assert not first.finished
    assert_all_blocks_free(async_engine.engine)


def test_a_closed_event_loop_aborts_its_requests_and_the_engine_goes_on(async_engine):
    """A loop closed under a running request cannot take its outputs: that request is aborted
    and every other one carries on."""
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    orphan_loop = asyncio.new_event_loop()

    async def start():
        stream = async_engine.add_request("orphan", "a request whose loop goes away", params)
        return await stream.__anext__()

    assert not orphan_loop.run_until_complete(start()).finished
    orphan_loop.close()

    async def main():
        short = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
        out = await collect(async_engine.add_request("survivor", "another request", short))
        for _ in range(100):
            if async_engine.stats().num_kv_blocks_used == 0 and async_engine.stats().num_running == 0:
                return out
            await asyncio.sleep(0.02)
        raise AssertionError(f"blocks not freed: {async_engine.stats()}")

    out = asyncio.run(main())
    assert out[-1].finished and len(out[-1].outputs[0].token_ids) == 5
    assert not async_engine.is_dead
    assert_all_blocks_free(async_engine.engine)


def test_async_bad_input_raises_at_once(async_engine):
    async def main():
        with pytest.raises(ValueError, match="prompt is empty"):
            async_engine.add_request("bad", "", SamplingParams())
        stream = async_engine.add_request("dup", "x", SamplingParams(max_tokens=2))
        with pytest.raises(ValueError, match="already in use"):
            async_engine.add_request("dup", "y", SamplingParams())
        await collect(stream)

    asyncio.run(main())


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(async_engine, monkeypatch):
    runner = async_engine.engine.runner
    original = runner.execute
    calls = {"n": 0}

    def flaky(schedule):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected failure")
        return original(schedule)

    monkeypatch.setattr(runner, "execute", flaky)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)

    async def main():
        with pytest.raises(RuntimeError, match="injected failure"):
            await collect(async_engine.add_request("fails", "boom", params))
        return await collect(async_engine.add_request("works", "fine", params))

    items = asyncio.run(main())
    assert items[-1].finished and len(items[-1].outputs[0].token_ids) == 3
    assert_all_blocks_free(async_engine.engine)


def test_a_dead_engine_loop_fails_waiting_requests_and_refuses_new_ones(tiny_path):
    from engine.async_engine import EngineDeadError

    engine = AsyncEngine(EngineConfig(model=tiny_path, num_kv_blocks=16))
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)

    def broken_schedule():
        raise RuntimeError("a bug in the scheduler")  # outside the model step's error handling

    engine.engine.scheduler.schedule = broken_schedule

    async def main():
        with pytest.raises(EngineDeadError, match="a bug in the scheduler"):
            await collect(engine.add_request("doomed", "hello", params))
        with pytest.raises(EngineDeadError):
            engine.add_request("later", "hello", params)

    asyncio.run(main())
    assert engine.is_dead
    assert_all_blocks_free(engine.engine)


def test_generate_returns_a_failed_request_with_finish_reason_error_and_completes_the_others(llm, monkeypatch):
    """One request failing in its own bookkeeping (here: its detokenization raises at its third
    token) does not cost the call: it comes back finished with finish_reason "error" and what it
    had generated, the others as they run alone."""
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = ["first prompt", "the doomed prompt", "third prompt"]
    alone = [out.outputs[0].token_ids for out in llm.generate(prompts, params, use_tqdm=False)]
    fail_detokenizing_the_doomed_prompt(llm.engine, monkeypatch)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [out.prompt for out in outs] == prompts and all(out.finished for out in outs)
    assert [out.outputs[0].finish_reason for out in outs] == ["length", "error", "length"]
    assert outs[1].outputs[0].token_ids == alone[1][:3]
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == [alone[0], alone[2]]
    assert_all_blocks_free(llm.engine)


def test_a_failed_forward_pass_fails_its_requests_with_finish_reason_error_and_generate_goes_on(llm, monkeypatch):
    runner = llm.engine.runner
    original = runner.execute
    calls = {"n": 0}

    def fails_once(schedule):
        calls["n"] += 1
        if calls["n"] == 2:  # the second step: both requests are decoding
            raise RuntimeError("injected forward failure")
        return original(schedule)

    monkeypatch.setattr(runner, "execute", fails_once)
    outs = llm.generate(["one", "two"], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert [(out.outputs[0].finish_reason, len(out.outputs[0].token_ids)) for out in outs] == [("error", 1)] * 2
    monkeypatch.setattr(runner, "execute", original)
    again = llm.generate("one", SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert again[0].outputs[0].finish_reason == "length"
    assert_all_blocks_free(llm.engine)


def test_a_forward_pass_that_always_fails_kills_the_engine_instead_of_failing_request_after_request(tiny_path):
    """Forward passes failing one after another over different requests mean the model cannot
    run: after MAX_CONSECUTIVE_FORWARD_FAILURES the engine reports itself dead, fails what is
    queued, and refuses new requests (the server's /readyz and /livez turn 503 on is_dead)."""
    from engine.async_engine import EngineDeadError
    from engine.llm_engine import MAX_CONSECUTIVE_FORWARD_FAILURES

    engine = AsyncEngine(EngineConfig(model=tiny_path, num_kv_blocks=16))

    def broken_forward(schedule):
        raise RuntimeError("the device is gone")

    engine.engine.runner.execute = broken_forward
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)

    async def main():
        for i in range(MAX_CONSECUTIVE_FORWARD_FAILURES - 1):
            with pytest.raises(RuntimeError, match="the device is gone"):
                await collect(engine.add_request(f"r{i}", "hello", params))
        assert not engine.is_dead
        with pytest.raises(EngineDeadError, match=f"failed {MAX_CONSECUTIVE_FORWARD_FAILURES} times in a row"):
            await collect(engine.add_request("last", "hello", params))
        with pytest.raises(EngineDeadError):
            engine.add_request("later", "hello", params)

    asyncio.run(main())
    assert engine.is_dead
    assert_all_blocks_free(engine.engine)
