"""The weights in one arena on 2 MiB pages (engine/host_arena.py): the kernel gives huge pages
where THP allows them, a move keeps every holder's values and ties, frees the old memory, and the
engine places its weights there without changing a token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from engine import LLM, SamplingParams
from engine.host_arena import HUGE_PAGE, huge_page_buffer, huge_page_bytes, move_storages, move_weights, plain_buffer
from engine.memory import process_memory, storage_bytes, weight_tensors
from engine.models.llama import forget_layer_op_plans

MiB = 2**20


def thp_mode() -> str:
    """The selected transparent-huge-page mode: "always", "madvise", "never" or "unknown"."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        return text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        return "unknown"


def thp_allows_madvise() -> bool:
    """Transparent huge pages for madvised memory ("always" or "madvise" selected)."""
    return thp_mode() in ("always", "madvise")


def thp_fault_fallbacks() -> int:
    """Huge-page faults the kernel served with 4 KiB pages for want of a free huge page."""
    try:
        return sum(int(line.split()[1]) for line in Path("/proc/vmstat").read_text().splitlines()
                   if line.startswith("thp_fault_fallback "))
    except OSError:
        return 0


def storage_of(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_huge_page_buffer_is_aligned_zeroed_and_writable():
    buf = huge_page_buffer(5 * MiB + 123)
    assert buf.dtype == torch.uint8 and buf.numel() == 5 * MiB + 123
    assert buf.data_ptr() % HUGE_PAGE == 0
    assert int(buf.count_nonzero()) == 0
    buf.fill_(7)
    assert int(buf.sum()) == 7 * buf.numel()
    assert huge_page_buffer(0).numel() == 0


@pytest.mark.skipif(not thp_allows_madvise(), reason="transparent huge pages are off on this host")
def test_the_kernel_backs_the_buffer_with_huge_pages():
    fallbacks = thp_fault_fallbacks()
    buf = huge_page_buffer(8 * MiB)
    buf.fill_(1)  # fault the pages in
    if huge_page_bytes(buf) == 0 and thp_fault_fallbacks() > fallbacks:
        pytest.skip("the kernel had no free huge page (it counted a fallback to 4 KiB pages)")
    assert huge_page_bytes(buf) >= 2 * HUGE_PAGE
    # The baseline must be a mapping of its own: glibc serves a buffer above its largest mmap
    # threshold (32 MiB) with a fresh mmap, while a smaller one can reuse heap memory that another
    # library (numpy advises its large arrays) marked for huge pages earlier in the process.
    plain = plain_buffer(64 * MiB)
    plain.fill_(1)
    # smaps reports per mapping: where the kernel merged the buffer's mapping with a neighbour (one
    # full-suite run in three on a Zen 4 host reported 24 MiB of huge pages there), or the buffer
    # starts inside a smaller mapping it does not fill (a full-suite run reported a 28.7 MiB one with
    # 20 MiB of huge pages), the count is not the buffer's own, so the check holds only where the
    # mapping is the buffer's alone: at least its size, at most a huge page more.
    low, high = mapping_bounds(plain)
    if thp_mode() == "madvise" and 64 * MiB <= high - low <= 64 * MiB + HUGE_PAGE:
        assert huge_page_bytes(plain) == 0, (low, high)  # unadvised memory stays on 4 KiB pages


def mapping_bounds(t: torch.Tensor) -> tuple[int, int]:
    """The [low, high) addresses of the /proc/self/smaps mapping holding t's storage."""
    address = t.untyped_storage().data_ptr()
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(a, 16) for a in head.split("-"))
            if low <= address < high:
                return low, high
    raise AssertionError("no mapping holds the tensor")


def test_the_mapping_lives_as_long_as_its_last_tensor():
    rss = process_memory().get("RssAnon")
    if rss is None:
        pytest.skip("no /proc")
    buf = huge_page_buffer(64 * MiB)
    buf.fill_(1)
    view = buf[10:20]
    del buf
    assert process_memory()["RssAnon"] - rss > 48 * MiB  # the view keeps it mapped
    assert int(view.sum()) == 10
    del view
    assert process_memory()["RssAnon"] - rss < 16 * MiB  # unmapped with the last tensor


class Holder(nn.Module):
    """Weights as the model layer holds them: a parameter tied into a second module, a buffer that
    is a view of a larger tensor (the column strips are), another dtype."""

    def __init__(self, gen: torch.Generator):
        super().__init__()
        self.embed = nn.Parameter(torch.randn(300, 64, generator=gen).to(torch.bfloat16), requires_grad=False)
        self.head = nn.Module()
        self.head.weight = self.embed
        strips = torch.randint(-128, 127, (12, 8, 16, 2), generator=gen, dtype=torch.int8)
        self.register_buffer("codes", strips.view(12, 8, 32))
        self.register_buffer("scales", torch.rand(12, generator=gen))


@pytest.mark.parametrize("allocate", [huge_page_buffer, plain_buffer], ids=["huge", "plain"])
def test_a_move_keeps_values_ties_and_views_and_lands_in_one_buffer(gen, allocate):
    m = Holder(gen)
    before = {name: t.clone() for name, t in m.state_dict().items()}
    strips_base = m.codes._base
    arena = move_weights(m, allocate)
    # Each storage once (the tie too), each rounded up to a cache line: 38400 + 3072 + 64 bytes.
    assert arena is not None and arena.numel() == 300 * 64 * 2 + 12 * 8 * 32 + 64
    for name, t in m.state_dict().items():
        assert torch.equal(t, before[name]), name
        assert storage_of(t) == storage_of(arena), name
    assert m.head.weight is m.embed  # the tie is the same tensor, moved once
    assert storage_of(strips_base) == storage_of(arena)  # the view's base moved with it
    for t in weight_tensors(m):  # each storage starts on a cache line
        assert t.data_ptr() % 64 == 0
    # Memory reports count each weight's own bytes in the shared arena, the tie once.
    assert storage_bytes([m.codes]) == 12 * 8 * 32 and storage_bytes([m.embed, m.head.weight]) == 300 * 64 * 2
    assert storage_bytes(weight_tensors(m)) == 300 * 64 * 2 + 12 * 8 * 32 + 12 * 4


def test_a_move_gives_the_old_memory_back():
    """64 MiB of weights (views of larger tensors, as the strips are) moved: the process grows by
    far less than their size, so the old storages (and their views' bases) were freed."""
    m = nn.Module()
    for i in range(4):
        m.register_buffer(f"w{i}", torch.ones(16 * MiB // 2, dtype=torch.bfloat16).view(-1, 2).view(-1))
    rss = process_memory().get("RssAnon")
    if rss is None:
        pytest.skip("no /proc")
    move_weights(m)
    assert process_memory()["RssAnon"] - rss < 24 * MiB
    assert all(float(t.float().mean()) == 1.0 for t in m.buffers())


def test_move_storages_moves_a_cache_list_and_leaves_other_devices_alone(gen):
    caches = [torch.randn(4, 16, 2, 8, generator=gen) for _ in range(3)]
    meta = torch.empty(3, device="meta")
    copies = [c.clone() for c in caches]
    arena = move_storages([*caches, meta], huge_page_buffer)
    assert all(storage_of(c) == storage_of(arena) and torch.equal(c, k) for c, k in zip(caches, copies))
    assert move_storages([meta]) is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_engine_holds_its_weights_in_one_arena_and_moving_them_changes_no_token(tiny_path, dtype):
    llm = LLM(tiny_path, dtype=dtype, num_kv_blocks=32, num_threads=1)
    model = llm.engine.runner.model_runner.model
    storages = set()
    for t in weight_tensors(model):
        try:
            storages.add(storage_of(t))
        except NotImplementedError:  # oneDNN's packed float32 weights stay in its allocation
            pass
    assert len(storages) == 1
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 9, 17, 33, 2], [7, 7, 100, 42]]
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    move_weights(model, plain_buffer)  # what bench/profile_step.py --ab-huge-pages does between passes
    forget_layer_op_plans(model)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == first
