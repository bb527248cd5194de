"""Host slots through a real Mooncake Store (python/lmdeploy_hostcache/
mooncake_store.py): a master, a metadata server and a storage node on
127.0.0.1 in a private network namespace (cluster.py), a writer process and
a reader process (roundtrip.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from procs import in_private_netns  # tests/engine/procs.py (this folder's conftest puts it on the path)

from lmdeploy_hostcache.mooncake_store import StoreConfig

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def roundtrip(store_usable, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("store") / "roundtrip.json"
    # its own PID namespace too: if the run is killed, the store's processes go with it
    cmd = ["unshare", "--pid", "--fork", "--kill-child", *in_private_netns([sys.executable, str(HERE / "roundtrip.py"),
                                                                          "--out", str(out)])[1:]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("layout", ["bf16", "int8", "int4"])  # quant policies 0, 8, 4
def test_another_process_gets_back_exactly_the_saved_bytes(roundtrip, layout):
    wrote, read = roundtrip["write"][layout], roundtrip["read"][layout]
    assert all(wrote["put"]), wrote
    assert read["exists"] == [True] * 8 + [False], read  # the writer's objects outlived it, on the storage node
    assert all(read["got"]) and read["differ_before"] and read["equal"], read


@pytest.mark.parametrize("layout", ["bf16", "int4"])
def test_a_missing_key_or_an_object_of_another_size_is_a_miss(roundtrip, layout):
    read = roundtrip["read"][layout]
    assert read["missing"] == [False] and read["wrong_size"] == [False], read


def test_the_config_file_is_checked_key_by_key(tmp_path):
    def config(text: str):
        path = tmp_path / "mooncake.json"
        path.write_text(text)
        return StoreConfig.from_file(str(path))

    good = config('{"metadata_server": "P2PHANDSHAKE", "master_server_address": "10.0.0.1:50051", '
                  '"local_buffer_size": "512MB", "global_segment_size": ".5GB"}')
    assert good.protocol == "rdma" and good.local_buffer_size == 512 << 20 and good.global_segment_size == 1 << 29
    for text, said in [("[]", "must be a JSON object"), ("{", "is not JSON"),
                       ('{"master_server_address": "a:1"}', "metadata_server must be a non-empty string"),
                       ('{"metadata_server": "m", "master_server_address": "a:1", "protocol": "udp"}',
                        'protocol must be "tcp" or "rdma"'),
                       ('{"metadata_server": "m", "master_server_address": "a:1", "local_buffer_size": "lots"}',
                        "local_buffer_size must be a number of bytes")]:
        with pytest.raises(ValueError, match=said):
            config(text)
    with pytest.raises(ValueError, match="cannot be read"):
        StoreConfig.from_file(str(tmp_path / "absent.json"))


def test_a_master_that_never_answers_is_given_up_on_in_bounded_time(store_usable, tmp_path):
    """Mooncake's setup against such a master holds the GIL for minutes: the
    client in a child process that tries first is what bounds it."""
    out = tmp_path / "silent.json"
    done = subprocess.run(in_private_netns([sys.executable, str(HERE / "silent_master.py"), "--out", str(out)]),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert "did not finish within" in r["error"], r
    assert r["bound"] <= r["seconds"] < r["bound"] + 5, r
    assert r["ticks"] > r["seconds"] * 100 * 0.5, r  # the process's other threads ran meanwhile
