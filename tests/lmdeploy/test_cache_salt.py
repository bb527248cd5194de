"""cache_salt (lmdeploy_patch/cache_salt.py): the request field and the
generation-config field, and on LMDeploy 0.18.0's real scheduler with the
host tier (benchmark/sim_engine.py) requests of different salts never share a block,
in the GPU prefix trie or in host memory, while requests of one salt (or of
none) share as before."""
from __future__ import annotations

import copy
import dataclasses
import pickle

import numpy as np
import pytest

pytest.importorskip("lmdeploy")

from benchmark.sim_engine import SimEngine  # noqa: E402
from test_scheduler_tier import assert_balanced  # noqa: E402


def test_generation_config_takes_a_bounded_string():
    from lmdeploy import GenerationConfig

    assert GenerationConfig().cache_salt is None
    gen = GenerationConfig(max_new_tokens=4, cache_salt="tenant-a")
    assert gen.cache_salt == "tenant-a"
    for kept in (copy.deepcopy(gen), pickle.loads(pickle.dumps(gen)), dataclasses.replace(gen, max_new_tokens=8)):
        assert kept.cache_salt == "tenant-a"
    assert "cache_salt" in {f.name for f in dataclasses.fields(GenerationConfig)}
    assert gen != GenerationConfig(max_new_tokens=4, cache_salt="tenant-b")
    for bad, said in [(7, "got int"), ("", "got 0 characters"), ("s" * 1025, "got 1025 characters")]:
        with pytest.raises(ValueError, match="cache_salt must be None, or a string of 1 to 1024") as info:
            GenerationConfig(cache_salt=bad)
        assert said in str(info.value) and "sss" not in str(info.value)  # the salt is never echoed


def test_the_engine_keeps_only_the_salt_digest():
    from lmdeploy import GenerationConfig
    from lmdeploy.pytorch.messages import SamplingParam

    salted = SamplingParam.from_gen_config(GenerationConfig(cache_salt="tenant-a"))
    plain = SamplingParam.from_gen_config(GenerationConfig())
    assert getattr(plain, "cache_salt_identity", None) is None
    ident = salted.cache_salt_identity
    assert b"tenant-a" not in ident.digest and len(ident.digest) == 16
    assert pickle.loads(pickle.dumps(salted)).cache_salt_identity == ident
    again = SamplingParam.from_gen_config(GenerationConfig(cache_salt="tenant-a")).cache_salt_identity
    assert again == ident != SamplingParam.from_gen_config(GenerationConfig(cache_salt="tenant-b")).cache_salt_identity


@pytest.mark.parametrize("request_cls", ["ChatCompletionRequest", "CompletionRequest"])
def test_openai_requests_carry_the_salt_into_the_generation_config(request_cls):
    import pydantic
    from lmdeploy.serve.core.generation_config import build_generation_config
    from lmdeploy.serve.openai import protocol

    cls = getattr(protocol, request_cls)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]} if request_cls.startswith("Chat") \
        else {"model": "m", "prompt": "hi"}
    req = cls(**body, cache_salt="tenant-a")
    assert build_generation_config(req, {}, max_new_tokens=4).cache_salt == "tenant-a"
    assert build_generation_config(cls(**body), {}, max_new_tokens=4).cache_salt is None
    for bad in (7, "", "s" * 1025):
        with pytest.raises(pydantic.ValidationError) as info:
            cls(**body, cache_salt=bad)
        assert info.value.errors()[0]["loc"] == ("cache_salt",)


def _admit(eng: SimEngine, sid: int, tokens: np.ndarray, salt, steps: int = 2) -> int:
    """A new session whose first prompt is `tokens`, under `salt`: the tokens
    its first forward did not compute (GPU and host hits)."""
    import torch
    from lmdeploy import GenerationConfig
    from lmdeploy.pytorch.messages import SamplingParam

    param = SamplingParam.from_gen_config(GenerationConfig(cache_salt=salt))
    seq = eng.scheduler.add_session(sid).add_sequence(torch.from_numpy(tokens), sampling_param=param)
    eng.sessions[sid] = seq
    before = len(eng.stats.trace)
    while True:
        batch = eng.loop.admit()
        assert batch
        done = seq in batch
        eng._after_prefill(batch, steps if done else 0)
        if done:
            break
    start = next(s for sid_, s, _ in eng.stats.trace[before:] if sid_ == sid)
    eng.scheduler.end_session(sid)
    del eng.sessions[sid]
    return start


def test_salts_partition_the_gpu_trie_and_the_host_tier():
    eng = SimEngine(num_gpu_blocks=24, host_slots=128)
    rng = np.random.default_rng(3)
    prompt = rng.integers(100, 5000, size=100)  # 6 full blocks of 16
    assert _admit(eng, 1, prompt, "a") == 0
    assert _admit(eng, 2, prompt, "a") == 96       # same salt: served (GPU)
    assert _admit(eng, 3, prompt, "b") == 0        # another salt: nothing, though the blocks are cached
    assert _admit(eng, 4, prompt, None) == 0       # no salt is its own namespace
    assert _admit(eng, 5, prompt, None) == 96
    for k in range(8):  # other prompts push everything out of the 24 GPU blocks
        _admit(eng, 100 + k, rng.integers(6000, 9000, size=100), None)
    host_before = eng.tier.stats.hit_tokens
    assert _admit(eng, 6, prompt, "c") == 0        # never sent with this salt: no host hit either
    assert eng.tier.stats.hit_tokens == host_before
    assert _admit(eng, 7, prompt, "b") == 96       # b's own blocks, from host memory
    assert eng.tier.stats.hit_tokens > host_before
    eng.end_all()
    assert_balanced(eng)


def test_salted_blocks_stay_out_of_the_host_tier_of_another_salt():
    """The host namespace is the adapter and the salt: the same tokens under
    two salts are two host entries."""
    from lmdeploy_patch import cache_salt

    a, b = cache_salt.identity("a"), cache_salt.identity("b")
    spaces = {cache_salt.namespace(None, None), cache_salt.namespace(None, a), cache_salt.namespace(None, b),
              cache_salt.namespace("lora", None), cache_salt.namespace("lora", a)}
    assert len(spaces) == 5 and cache_salt.namespace(None, None) == 0
    assert cache_salt.split((a,)) == (a, ()) and cache_salt.split(()) == (None, ())


def test_without_the_salt_identity_the_same_prompt_is_shared(monkeypatch):
    """Negative control for the partition test: with the salt kept out of the
    block identity, another salt is served the first salt's blocks."""
    from lmdeploy_patch import cache_salt

    monkeypatch.setattr(cache_salt, "identity", lambda salt: None)
    eng = SimEngine(num_gpu_blocks=24, host_slots=128)
    prompt = np.random.default_rng(3).integers(100, 5000, size=100)
    assert _admit(eng, 1, prompt, "a") == 0
    assert _admit(eng, 2, prompt, "b") == 96
    eng.end_all()


def test_turbomind_with_prefix_caching_refuses_a_salt():
    """TurboMind's compiled prefix cache keys blocks by tokens alone: a salted
    request there is refused, not silently shared (hooks/async_engine.py)."""
    from types import SimpleNamespace

    from lmdeploy import GenerationConfig
    from lmdeploy.serve.core.async_engine import AsyncEngine

    def engine(backend, prefix):
        return SimpleNamespace(backend=backend, backend_config=SimpleNamespace(enable_prefix_caching=prefix))

    with pytest.raises(ValueError, match="cache_salt needs the PyTorch engine"):
        AsyncEngine._determine_gen_config(engine("turbomind", True), [1], GenerationConfig(cache_salt="a"))
    connector = SimpleNamespace(backend="pytorch", backend_config=SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_connector="mooncake")))
    with pytest.raises(ValueError, match="external KV connector"):
        AsyncEngine._determine_gen_config(connector, [1], GenerationConfig(cache_salt="a"))
    # past the check, LMDeploy's own body runs and asks for the engine's tokenizer: the check let it through
    for passes, gen in ((engine("turbomind", False), GenerationConfig(cache_salt="a")),
                        (engine("pytorch", True), GenerationConfig(cache_salt="a")),
                        (engine("turbomind", True), GenerationConfig())):
        with pytest.raises(AttributeError, match="tokenizer"):
            AsyncEngine._determine_gen_config(passes, [1], gen)


def test_ssm_checkpoints_check_the_salt_exactly():
    """SSM state checkpoints are verified against the request's exact
    identity (block_trie.checkpoint); a salted request's includes its salt,
    through the trie module's binding too."""
    import torch
    from lmdeploy import GenerationConfig
    from lmdeploy.pytorch.messages import SamplingParam
    from lmdeploy.pytorch.paging.block_trie import checkpoint, trie

    eng = SimEngine(num_gpu_blocks=24)
    salted = eng.scheduler.add_session(1).add_sequence(
        torch.arange(40), sampling_param=SamplingParam.from_gen_config(GenerationConfig(cache_salt="a")))
    plain = eng.scheduler.add_session(2).add_sequence(torch.arange(40))
    ident = salted.sampling_param.cache_salt_identity
    for fn in (checkpoint.make_request_multimodal_identity, trie.make_request_multimodal_identity):
        assert fn(salted, 32) == (ident,) and fn(plain, 32) == ()
