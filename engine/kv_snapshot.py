"""A picture of the KV cache for the dashboard: every block's state and which request holds it.

Built on the thread that steps (AsyncEngine hands the request over its command queue and the
loop answers between two steps), so it reads a consistent pool without a lock and costs the
step nothing when nobody asks: one pass over the blocks, a few milliseconds for 30k blocks.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any


def kv_snapshot(engine: Any) -> dict[str, Any]:
    """JSON-ready: `blocks` has one character per device block ('f' free, 'c' cached-free,
    'u' in use, 's' shared; engine/block_manager.py: block_states); `swapped_blocks` counts the
    CPU pool's blocks held by swapped-out requests; `requests` lists running, waiting and
    swapped requests with the blocks they hold (CPU block ids for swapped ones)."""
    scheduler = engine.scheduler
    requests = []
    for state, groups in (("running", scheduler.running), ("waiting", scheduler.waiting), ("swapped", scheduler.swapped)):
        for group in groups:
            seqs = group.seqs or group.finished
            requests.append({
                "id": group.request_id,
                "state": state,
                "sequences": len(group.seqs),
                "tokens": max((len(seq.token_ids) for seq in seqs), default=0),
                "blocks": sorted({block for seq in group.seqs for block in seq.block_table}),
            })  # fmt: skip
    swapped_blocks = sum(len(r["blocks"]) for r in requests if r["state"] == "swapped")
    return {
        "time": time.time(),
        "block_size": engine.block_manager.block_size,
        "blocks": engine.block_manager.block_states(),
        "swapped_blocks": swapped_blocks,
        "requests": requests,
        "stats": asdict(engine.stats()),
    }
