"""A master and metadata server that accept connections and never answer
(a stopped or wedged process): connecting must fail within the setup bound
(lmdeploy_hostcache.mooncake_store.SETUP_TIMEOUT_S, 4 s here) while the
process's other threads go on running; writes what happened as JSON. Run
inside a private network namespace (test_mooncake_store.py does).

    python tests/store/silent_master.py --out FILE.json
"""
from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from pathlib import Path


def silent_listener() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    held = []

    def accept() -> None:
        while True:
            held.append(s.accept()[0])  # kept open, never answered

    threading.Thread(target=accept, daemon=True).start()
    return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import lmdeploy_hostcache.mooncake_store as ms

    ms.SETUP_TIMEOUT_S = 4.0
    master, meta = silent_listener(), silent_listener()
    config = Path(args.out).with_suffix(".mooncake.json")
    config.write_text(json.dumps({"metadata_server": f"http://127.0.0.1:{meta}/metadata",
                                  "master_server_address": f"127.0.0.1:{master}", "protocol": "tcp"}))
    ticks = [0]

    def tick() -> None:
        while True:
            ticks[0] += 1
            time.sleep(0.01)

    threading.Thread(target=tick, daemon=True).start()
    t0 = time.monotonic()
    error = ""
    try:
        ms.MooncakeStore(ms.StoreConfig.from_file(str(config)))
    except ConnectionError as e:
        error = str(e)
    took = time.monotonic() - t0
    Path(args.out).write_text(json.dumps({"seconds": took, "error": error, "ticks": ticks[0],
                                          "bound": ms.SETUP_TIMEOUT_S}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
