"""A random-weight Llama-architecture model directory with a tokenizer, made
offline, for the GPU tests and benchmarks (no hub, no download).

    python tests/engine/tiny_model.py /tmp/hc-tiny                    # tests: ~5 MB, a few seconds on CPU
    python tests/engine/tiny_model.py /tmp/hc-8b --llama3-8b-shape --corpus .whl/sharegpt_sample.json
                                                                    # benchmarks: built on the GPU

The tokenizer is a word-level one over generated words (`tokenizers`
WordLevel with Metaspace, so `decode` gives "word word ..."), wrapped as
`transformers.PreTrainedTokenizerFast`, with <s>, </s>, <unk>, role markers
and a chat template in tokenizer_config.json. LMDeploy 0.18 then picks
`HFChatTemplate` for the directory (lmdeploy/model.py get_chat_template: no
path-name template matches, the HF tokenizer's apply_chat_template works).
Keep the directory name free of model names that LMDeploy's templates match
on ('llama2', 'vicuna', 'internlm', 'qwen', ...).

Tiny variant (default): hidden 256, 4 layers, 4 heads, 2 KV heads, head dim
64, MLP 512, vocab = tokenizer size (512: 505 words + 7 special), 4096 positions, bf16, seeded, and
a large initializer_range (0.5). Greedy argmax margins are still only a few
bf16 steps (0.125-0.375 at logit std ~8, measured): kernels that round
differently can change tokens, which is why token equality across different
batches is asserted with the CPU shim's batch-invariant numerics only
(docs/testing.md).
KV per 64-token block: 4 layers x 2 x 2 heads x 64 x 64 x 2 B = 128 KiB (bf16).

`llama3_8b_shape=True`: the shape of Llama-3-8B (32 layers, hidden 4096, 32
heads, 8 KV heads, head dim 128, MLP 14336, rope theta 500000, 40960
positions so that the long-context scenario's 32K-token prompts fit) with the
small vocabulary: 6.98e9 parameters, 13.0 GiB of bf16 safetensors; KV per
token 128 KiB (bf16), the figure the benchmarks use for Llama-3-8B. Its weights are drawn on the
GPU (device='cuda'), in bf16, std 0.02, and written straight from there:
about 20-40 s, mostly the disk write; needs ~14 GB free on the GPU and on disk.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SPECIAL = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
UNK, BOS, EOS = SPECIAL[0], SPECIAL[1], SPECIAL[2]
# One message: <|role|>content<|end|>; generation prompt: <|assistant|>.
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def words(n: int, seed: int = 0) -> list[str]:
    """n distinct lowercase pseudo-words, the same for the same seed."""
    import random

    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        w = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 4)))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def build_tokenizer(num_words: int = 505, seed: int = 0):
    """A PreTrainedTokenizerFast: ids 0..6 are SPECIAL, then the words."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for w in words(num_words, seed):
        vocab["\u2581" + w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=EOS,
                                   model_max_length=4096, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_bpe_tokenizer(corpus: str | os.PathLike, vocab_size: int = 16000):
    """A byte-level BPE tokenizer trained on ShareGPT text (a file written by
    `benchmark/sharegpt.py --export`), for benchmarks: real conversations then
    tokenise to distinct ids of realistic count instead of <unk>."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    records = json.loads(Path(corpus).read_text())
    texts = [m["value"] for r in records for m in r.get("conversations", []) if m.get("value")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=EOS,
                                   model_max_length=8192, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def word_ids(tokenizer) -> list[int]:
    """The ids of the plain words (what prompts are drawn from)."""
    return [i for t, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]) if t not in SPECIAL]


def _config(vocab_size: int, tokenizer, llama3_8b_shape: bool, initializer_range: float | None):
    from transformers import LlamaConfig

    ids = dict(bos_token_id=tokenizer.convert_tokens_to_ids(BOS), eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
               pad_token_id=tokenizer.convert_tokens_to_ids(EOS))
    if llama3_8b_shape:
        shape = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-5,
                     initializer_range=0.02 if initializer_range is None else initializer_range,
                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    else:
        shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, rms_norm_eps=1e-5,
                     initializer_range=0.5 if initializer_range is None else initializer_range,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    try:
        cfg = LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=False, dtype="bfloat16", **shape, **ids)
    except TypeError:  # transformers 4.x: rope_theta and torch_dtype
        rope = shape.pop("rope_parameters")
        cfg = LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=False, torch_dtype="bfloat16",
                          rope_theta=rope["rope_theta"], **shape, **ids)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def build(path: str | os.PathLike, *, llama3_8b_shape: bool = False, num_words: int = 505, seed: int = 0,
          initializer_range: float | None = None, device: str | None = None, corpus: str | None = None) -> Path:
    """Write the model directory at `path` (made if missing) and return it.

    Idempotent: a directory that already holds a model built with the same
    arguments (build_args.json) is left as it is."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    path = Path(path)
    args = dict(llama3_8b_shape=llama3_8b_shape, num_words=num_words, seed=seed, initializer_range=initializer_range,
                corpus=str(corpus) if corpus else None)
    stamp = path / "build_args.json"
    if stamp.exists() and json.loads(stamp.read_text()) == args and (path / "config.json").exists():
        return path
    device = device or ("cuda" if llama3_8b_shape else "cpu")
    path.mkdir(parents=True, exist_ok=True)

    tokenizer = build_bpe_tokenizer(corpus) if corpus else build_tokenizer(num_words, seed)
    cfg = _config(len(tokenizer), tokenizer, llama3_8b_shape, initializer_range)
    torch.manual_seed(seed)
    if device.startswith("cuda"):
        torch.cuda.manual_seed_all(seed)
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old_dtype)
    model = model.to(dtype=torch.bfloat16).eval()
    model.generation_config = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                               pad_token_id=cfg.pad_token_id, do_sample=False)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # The chat template also lives in tokenizer_config.json (transformers 5 writes
    # chat_template.jinja beside it; older readers look in the config).
    tc = path / "tokenizer_config.json"
    conf = json.loads(tc.read_text())
    conf["chat_template"] = CHAT_TEMPLATE
    conf.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    tc.write_text(json.dumps(conf, indent=2))
    stamp.write_text(json.dumps(args))
    del model
    return path


def param_count(cfg) -> int:
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = cfg.head_dim
    attn = h * cfg.num_attention_heads * hd * 2 + h * cfg.num_key_value_heads * hd * 2
    return n * (attn + 3 * h * i + 2 * h) + 2 * cfg.vocab_size * h + h


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path")
    p.add_argument("--llama3-8b-shape", action="store_true")
    p.add_argument("--device", default=None, help="where weights are drawn (default: cpu; cuda for the 8B shape)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--initializer-range", type=float, default=None)
    p.add_argument("--corpus", help="train a byte-level BPE tokenizer on this exported ShareGPT sample "
                                    "(benchmark/sharegpt.py --export) instead of the word-level test one")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    out = build(a.path, llama3_8b_shape=a.llama3_8b_shape, device=a.device, seed=a.seed,
                initializer_range=a.initializer_range, corpus=a.corpus)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(out)
    print(f"{out}: {param_count(cfg) / 1e6:.1f} M parameters, {size / 2**20:.1f} MiB, vocab {cfg.vocab_size}, "
          f"{cfg.num_hidden_layers} layers, {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
