"""Store keys (lmdeploy_patch/store_keys.py) and how a rank's link reads
the store's answers (lmdeploy_patch/store_link.py). The real store's
answers to these calls are tests/store/test_mooncake_store.py's; here each
code is fed to the link directly, to pin down what it makes of it."""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from lmdeploy_patch import store_keys
from lmdeploy_patch.store_link import StoreLink

BASE = dict(model_name="Llama-3-8B-Instruct", config_digest="abc", kv_dtype="torch.bfloat16", quant_policy=4,
            block_size=64, tp_size=1, slot_bytes=2 << 20)


@pytest.mark.parametrize("field,other", [("model_name", "Qwen3-8B"), ("config_digest", "abd"),
                                         ("kv_dtype", "torch.float16"), ("quant_policy", 8), ("block_size", 32),
                                         ("tp_size", 2), ("slot_bytes", 4 << 20)])
def test_every_setting_is_in_the_engine_namespace(field, other):
    assert store_keys.engine_namespace(**BASE) == store_keys.engine_namespace(**BASE)
    assert store_keys.engine_namespace(**{**BASE, field: other}) != store_keys.engine_namespace(**BASE)


def test_a_digest_names_the_whole_prefix_and_its_request_namespace():
    root = store_keys.root_digest(store_keys.engine_namespace(**BASE))
    a, b = np.arange(64, dtype=np.int32), np.arange(64, 128, dtype=np.int32)
    ab = store_keys.chain(root, 0, np.concatenate([a, b]), 64)
    assert len(ab) == 2 and ab[0] == store_keys.block_digest(root, 0, a)
    assert store_keys.chain(root, 0, b, 64)[0] != ab[1]  # the same block after another prefix
    assert store_keys.chain(root, 7, np.concatenate([a, b]), 64) != ab  # another adapter or salt
    other_root = store_keys.root_digest(store_keys.engine_namespace(**{**BASE, "quant_policy": 0}))
    assert store_keys.chain(other_root, 0, a, 64)[0] != ab[0]
    assert len(ab[0]) == store_keys.DIGEST_BYTES == 16
    assert store_keys.key_prefix("ns", 1) != store_keys.key_prefix("ns", 0)


def test_the_model_identity_ignores_where_it_was_loaded_from():
    def cfg(path):
        return SimpleNamespace(to_dict=lambda: {"_name_or_path": path, "hidden_size": 4096,
                                                "transformers_version": "4.5"})

    assert store_keys.model_identity(cfg("/models/Llama-3-8B/")) == store_keys.model_identity(cfg("/x/Llama-3-8B"))
    assert store_keys.model_identity(cfg("/m/Llama-3-8B"))[0] == "Llama-3-8B"


class Answers:
    """Stands in for lmdeploy_hostcache.MooncakeStore: answers given codes."""

    def __init__(self, exists=(), gets=(), puts=()):
        self.exists, self.gets, self.puts, self.put_keys = list(exists), list(gets), list(puts), []

    def exists_codes(self, keys):
        return self.exists[:len(keys)]

    def get_codes(self, keys, addrs, size):
        return self.gets[:len(keys)]

    def put_codes(self, keys, addrs, size):
        self.put_keys += keys
        return self.puts[:len(keys)]

    def close(self):
        pass


def _link(answers) -> StoreLink:
    return StoreLink(answers, "p/", lambda slot: 4096 * slot, 100)


def test_answers_are_hits_misses_or_counted_failures():
    d = [bytes([i]) * 16 for i in range(3)]
    link = _link(Answers(exists=[1, 1, 0]))
    assert link.lookup(d).result() == 2 and link.up()
    link = _link(Answers(exists=[1, -800, 1]))
    assert link.lookup(d).result() == 1 and link.counts["failures_error"] == 1 and not link.up()
    link = _link(Answers(gets=[100, -704, 99]))
    assert link.fetch(d, [0, 1, 2]).result() == [True, False, False]
    assert link.counts["failures_size"] == 1 and link.counts["failures_transfer"] == 0  # -704: a plain miss
    assert link.counts["fetched_blocks"] == 1 and link.counts["bytes_read"] == 100
    link = _link(Answers(gets=[100, -800]))
    assert link.fetch(d[:2], [0, 1]).result() == [True, False] and link.counts["failures_transfer"] == 1


def test_puts_skip_what_the_store_holds_and_count_a_full_store():
    d = [bytes([i]) * 16 for i in range(3)]
    answers = Answers(exists=[1, 0, 0], puts=[0, -200])
    link = _link(answers)
    done = []
    link.put(d, [0, 1, 2], done.append)
    deadline = time.monotonic() + 5
    while not done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done == [[True, True, False]]
    assert answers.put_keys == ["p/" + d[1].hex(), "p/" + d[2].hex()]
    assert link.counts["put_present"] == 1 and link.counts["put_blocks"] == 1 and link.counts["failures_full"] == 1
    assert not link.up()  # backs off after a failure
    assert link.close(1.0)


def test_back_off_doubles_and_a_success_resets_it():
    link = _link(Answers(exists=[1]))
    link.failed("timeout")
    first = link._down_until - time.monotonic()
    link._down_until = 0
    link.failed("timeout")
    assert link._down_until - time.monotonic() > first * 1.5
    link._down_until = 0
    link.lookup([b"x" * 16]).result()
    assert link._backoff == 1.0


def test_a_closed_link_answers_at_once():
    """Calls that race a close (a weights update on another thread) resolve
    without the store, so no slot waits on them."""
    link = _link(Answers(exists=[1], gets=[100]))
    assert link.close(1.0)
    assert link.lookup([b"x" * 16]).result(timeout=1) == 0
    assert link.fetch([b"x" * 16], [0]).result(timeout=1) == [False]
    done = []
    link.put([b"x" * 16], [0], done.append)
    assert done == [[False]]


def test_slot_layout_names_the_packing_not_the_block_count():
    import torch

    def allocation(blocks, offsets=(0, 64), dtype=torch.bfloat16):
        pool = torch.zeros(2, blocks, 256, dtype=torch.uint8)
        views = tuple(pool[:, :, o:o + 64].view(dtype).view(2, blocks, 2, 16) for o in offsets)
        return SimpleNamespace(pools=[SimpleNamespace(tensor=pool, entry_axis=1)], tensor_views=views)

    base = store_keys.slot_layout(allocation(8), 1)
    assert store_keys.slot_layout(allocation(32), 1) == base  # more GPU memory, the same slots
    assert store_keys.slot_layout(allocation(8, offsets=(0, 128)), 1) != base  # K and V packed elsewhere
    assert store_keys.slot_layout(allocation(8, dtype=torch.float16), 1) != base
    assert store_keys.slot_layout(allocation(8), 2) != base


def test_adapters_are_named_by_what_their_directories_hold(tmp_path):
    a, b = tmp_path / "run1" / "lora", tmp_path / "run2" / "lora"
    for d, size in ((a, 10), (b, 12)):
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text('{"r": 8}')
        (d / "adapter_model.safetensors").write_bytes(b"x" * size)
    assert store_keys.adapters_digest({"x": str(a)}) != store_keys.adapters_digest({"x": str(b)})
    assert store_keys.adapters_digest({"x": str(a)}) == store_keys.adapters_digest({"x": str(a)})
    assert store_keys.adapters_digest({"x": "org/lora"}) != store_keys.adapters_digest({"x": "other/lora"})
