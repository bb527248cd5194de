"""Test support, not product: LMDeploy 0.18.0's real PyTorch engine on a
machine without a GPU, for a dense Llama in eager mode.

The engine (pipeline, Engine, UniExecutor, ModelAgent, CacheEngine,
scheduler, prefix trie, model forward, sampling, the API server's spawned
engine process) runs as it is; only what needs CUDA is replaced, at the
level of torch and of LMDeploy's op-backend selector, without editing a
file of LMDeploy's:

- CUDA streams and events become null objects (distinct instances: the
  cache engine asserts that its stream is not the current one), and
  synchronisation, memory queries and device properties answer for a CPU
  (free "GPU" memory is free RAM);
- tensors made for 'cuda' (device=, .cuda(), .to('cuda'), pin_memory,
  record_stream) are made on the CPU by a TorchFunctionMode. Torch keeps
  its mode stack per thread, so every thread enters it when it starts;
- the op backend that `'cuda'` selects (Triton) is replaced by LMDeploy's
  DefaultOpsBackend plus a paged attention written in plain torch: new K/V
  are written into their block-table slots, quantised for quant policies 4
  and 8 as pytorch/kernels/cuda/fill_kv_cache.py does (per token and head,
  asymmetric, two 4-bit codes per byte with the second half of the head in
  the high nibble, scale and zero in the cache's dtype), and every query
  reads its context back through the block table;
- bf16 is reported as supported (it is computed on CPU, only slower);
- LMDEPLOY_ENABLE_CHECK_ENV=0 (no CUDA/Triton environment check) and
  TORCHDYNAMO_DISABLE=1 (rotary and RMSNorm call torch.compile).

Batch invariance: linear layers and attention accumulate in float64 and
round to the model dtype. A sequence's tokens then do not depend on which
other sequences share its forward or how its prompt was chunked (a result
that differs in the 16th digit rounds to the same bf16 value), so engines
whose schedules differ only in timing produce the same greedy tokens, and a
test can compare them token for token. The KV a forward reads is the only
thing left that can change a token: which is what the tests are about.

Refused with one line: any LMDeploy but 0.18.0, and attention features
this attention does not implement (sliding window, alibi, logit softcap,
MLA, learnable sinks, block-sparse attention, fp8 and TurboQuant KV).

Loaded by site/sitecustomize.py when HOSTCACHE_TEST_LMDEPLOY_ON_CPU=1 and
this folder is on PYTHONPATH (tests/engine/conftest.py sets both for the
engine processes it starts); nothing in lmdeploy_patch/ or python/ knows it.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Any

EXPECTED_LMDEPLOY = "0.18.0"
SWITCH = "HOSTCACHE_TEST_LMDEPLOY_ON_CPU"
_installed = False


class ShimRefused(RuntimeError):
    """The engine asked for something this shim does not implement."""


def _refuse(what: str) -> None:
    raise ShimRefused(f"lmdeploy_on_cpu (test support): {what} is not implemented on CPU; "
                      "use a dense model without it, or run this test on a GPU")


# ---------------------------------------------------------------- torch.cuda


class NullEvent:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


class NullStream:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> NullEvent:
        return event if event is not None else NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _DeviceProperties:
    name = "CPU (lmdeploy_on_cpu test support)"
    major, minor = 9, 0
    multi_processor_count = 1
    uuid = "00000000-0000-0000-0000-000000000000"

    @property
    def total_memory(self) -> int:
        import psutil

        return psutil.virtual_memory().total


def _patch_torch_cuda(torch: Any) -> None:
    import psutil

    cuda = torch.cuda
    default_stream = NullStream()

    def mem_get_info(device: Any = None) -> tuple[int, int]:
        vm = psutil.virtual_memory()
        return vm.available, vm.total

    values = {
        "Stream": NullStream, "Event": NullEvent, "stream": lambda s=None: contextlib.nullcontext(),
        "current_stream": lambda device=None: default_stream, "default_stream": lambda device=None: default_stream,
        "synchronize": lambda device=None: None, "empty_cache": lambda: None, "set_device": lambda device: None,
        "current_device": lambda: 0, "device_count": lambda: 1, "mem_get_info": mem_get_info,
        "get_device_name": lambda device=None: _DeviceProperties.name,
        "get_device_properties": lambda device=None: _DeviceProperties(),
        "get_device_capability": lambda device=None: (9, 0), "is_bf16_supported": lambda *a, **k: True,
        "memory_allocated": lambda device=None: 0, "max_memory_allocated": lambda device=None: 0,
        "memory_reserved": lambda device=None: 0, "reset_peak_memory_stats": lambda device=None: None,
        "manual_seed": lambda seed: None, "manual_seed_all": lambda seed: None,
    }
    for name, value in values.items():
        setattr(cuda, name, value)
    torch._C._cuda_clearCublasWorkspaces = lambda: None


def _is_cuda(device: Any) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # a CUDA ordinal (torch.cuda.current_device())
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return getattr(device, "type", None) == "cuda"


def _build_mode(torch: Any) -> Any:
    Tensor = torch.Tensor
    returns_self = {Tensor.cuda, Tensor.pin_memory}
    noop = {Tensor.record_stream}
    parse_to = torch._C._nn._parse_to

    class CudaAsCpu(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func in returns_self:
                return args[0]
            if func in noop:
                return None
            if _is_cuda(kwargs.get("device")):
                kwargs["device"] = "cpu"
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
            if func is Tensor.to and len(args) > 1 and _is_cuda(args[1]):
                args = (args[0], "cpu", *args[2:])
            elif func is parse_to and args and _is_cuda(args[0]):  # Module.to(device)
                args = ("cpu", *args[1:])
            return func(*args, **kwargs)

    return CudaAsCpu()


def _enter_mode_in_every_thread(mode: Any) -> None:
    mode.__enter__()
    original = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

    def _bootstrap_inner(self):  # noqa: ANN001
        with mode:
            original(self)

    threading.Thread._bootstrap_inner = _bootstrap_inner  # type: ignore[attr-defined]


# ---------------------------------------------------------------- op backend


def _build_backend() -> type:
    from dataclasses import dataclass

    import torch

    from lmdeploy.messages import QuantPolicy
    from lmdeploy.pytorch.backends.attention import AttentionImpl, AttentionMetadata, PagedAttentionBuildSpec
    from lmdeploy.pytorch.backends.default import DefaultOpsBackend
    from lmdeploy.pytorch.backends.linear import LinearBuildSpec, LinearImpl

    @dataclass
    class CpuAttentionMetadata(AttentionMetadata):
        """What the plain-torch attention reads: LMDeploy's base fields."""

    class Float64Linear(LinearImpl):
        def forward(self, x, weight, bias=None, all_reduce=False, group=None, rank=0, scatter_size=None):
            if all_reduce:
                _refuse("tensor parallelism")
            out = torch.nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())
            return out.to(x.dtype)

    class PlainTorchPagedAttention(AttentionImpl[CpuAttentionMetadata]):
        """Writes new K/V into the paged cache, then attends over the
        context read back through the block table, in float64."""

        def forward(self, query, key, value, k_cache, v_cache, attn_metadata, k_scales_zeros=None,
                    v_scales_zeros=None, learnable_sink=None, nsa_indices=None, inplace=False, **kwargs):
            if learnable_sink is not None or nsa_indices is not None:
                _refuse("attention with learnable sinks or sparse indices")
            m = attn_metadata
            quant = int(m.quant_policy)
            block_size = k_cache.size(1)
            out = torch.empty(query.shape[:-1] + (self.v_head_size,), dtype=query.dtype, device=query.device)
            q_starts, q_lens, kv_lens = m.q_start_loc.tolist(), m.q_seqlens.tolist(), m.kv_seqlens.tolist()
            for b, (q0, q_len, kv_len) in enumerate(zip(q_starts, q_lens, kv_lens)):
                if q_len == 0:
                    continue
                history = kv_len - q_len
                table = m.block_offsets[b]
                if key is not None:
                    pos = torch.arange(history, kv_len)
                    blocks, offs = table[pos // block_size].long(), pos % block_size
                    _write(k_cache, k_scales_zeros, blocks, offs, key[q0:q0 + q_len], quant)
                    _write(v_cache, v_scales_zeros, blocks, offs, value[q0:q0 + q_len], quant)
                ctx = torch.arange(kv_len)
                blocks, offs = table[ctx // block_size].long(), ctx % block_size
                k = _read(k_cache, k_scales_zeros, blocks, offs, quant)       # [kv_len, kv_heads, d]
                v = _read(v_cache, v_scales_zeros, blocks, offs, quant)
                q = query[q0:q0 + q_len].double()                            # [q_len, heads, d]
                group = self.num_heads // self.num_kv_heads
                k = k.repeat_interleave(group, dim=1)
                v = v.repeat_interleave(group, dim=1)
                scores = torch.einsum("qhd,khd->hqk", q, k) * self.scale
                if self.causal:
                    qpos = torch.arange(history, kv_len).unsqueeze(1)
                    scores = scores.masked_fill(ctx.unsqueeze(0) > qpos, float("-inf"))
                probs = torch.softmax(scores, dim=-1)
                out[q0:q0 + q_len] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
            return out

    def _write(cache, scales_zeros, blocks, offs, states, quant) -> None:
        if quant == QuantPolicy.NONE:
            cache[blocks, offs] = states.to(cache.dtype)
            return
        x = states.float()
        lo, hi = x.amin(dim=-1), x.amax(dim=-1)                           # per token and head
        levels = 15 if quant == QuantPolicy.INT4 else 255
        scales = (hi - lo) / levels
        zeros = -lo / scales
        codes = (x / scales[..., None] + zeros[..., None] + 0.5).to(torch.uint8)
        if quant == QuantPolicy.INT4:
            half = codes.size(-1) // 2
            codes = codes[..., :half] + codes[..., half:] * 16
        cache[blocks, offs] = codes
        scales_zeros[blocks, offs, :, 0] = scales.to(scales_zeros.dtype)
        scales_zeros[blocks, offs, :, 1] = zeros.to(scales_zeros.dtype)

    def _read(cache, scales_zeros, blocks, offs, quant):
        raw = cache[blocks, offs]
        if quant == QuantPolicy.NONE:
            return raw.double()
        if quant == QuantPolicy.INT4:
            raw = torch.cat([raw & 15, raw >> 4], dim=-1)
        sz = scales_zeros[blocks, offs].double()
        return (raw.double() - sz[..., 1:2]) * sz[..., 0:1]

    class CpuTestOpsBackend(DefaultOpsBackend):
        @staticmethod
        def get_name() -> str:
            return "cpu-test-shim"

        @classmethod
        def build_op(cls, spec, *, enable_deterministic: bool = False):
            if isinstance(spec, PagedAttentionBuildSpec):
                window = spec.sliding_window
                if window not in (None, -1, (-1, -1)):
                    _refuse(f"sliding-window attention (window {window})")
                if spec.alibi:
                    _refuse("alibi")
                if spec.logit_softcapping and spec.logit_softcapping > 0:
                    _refuse("logit softcapping")
                if spec.use_flash_mla or spec.mla_index_topk is not None:
                    _refuse("MLA")
                if spec.learnable_sink:
                    _refuse("learnable sinks")
                if spec.block_sparse_size != 1:
                    _refuse("block-sparse attention")
                return PlainTorchPagedAttention(num_heads=spec.num_heads, head_size=spec.head_dim, scale=spec.scale,
                                                num_kv_heads=spec.num_kv_heads, v_head_size=spec.v_head_dim,
                                                causal=spec.causal)
            if isinstance(spec, LinearBuildSpec):
                return Float64Linear()
            return super().build_op(spec, enable_deterministic=enable_deterministic)

        @staticmethod
        def get_attention_metadata_cls():
            return CpuAttentionMetadata

        @classmethod
        def update_step_context(cls, step_context):
            quant = step_context.kv_quant_policy
            if int(quant) not in (QuantPolicy.NONE, QuantPolicy.INT4, QuantPolicy.INT8):
                _refuse(f"KV quant policy {int(quant)} (fp8 / TurboQuant)")
            step_context.attn_metadata = CpuAttentionMetadata(
                is_decoding=step_context.is_decoding, block_offsets=step_context.block_offsets,
                q_start_loc=step_context.q_start_loc, q_seqlens=step_context.q_seqlens,
                kv_seqlens=step_context.kv_seqlens, quant_policy=quant)
            return step_context

        @staticmethod
        def ccl_backend() -> str:
            return "gloo"

    return CpuTestOpsBackend


def _check_version() -> None:
    import importlib.metadata

    version = importlib.metadata.version("lmdeploy")
    if version != EXPECTED_LMDEPLOY:
        raise ShimRefused(f"lmdeploy_on_cpu (test support) is written for LMDeploy {EXPECTED_LMDEPLOY}, "
                          f"found {version}: pin lmdeploy=={EXPECTED_LMDEPLOY}")


def _patch_lmdeploy() -> None:
    import lmdeploy.utils
    from lmdeploy.pytorch import config as pt_config
    from lmdeploy.pytorch.backends import selector

    backend = _build_backend()
    original = selector._get_backend

    def _get_backend():
        from lmdeploy.pytorch.devices import get_device_manager

        if get_device_manager().current_context().device_type == "cuda":
            return backend
        return original()

    selector._get_backend = _get_backend
    lmdeploy.utils.is_bf16_supported = pt_config.is_bf16_supported = lambda device_type="cuda": True


def install() -> None:
    """Idempotent; raises ShimRefused (one line) on an unsupported LMDeploy."""
    global _installed
    if _installed:
        return
    _check_version()  # before anything is patched
    os.environ["LMDEPLOY_ENABLE_CHECK_ENV"] = "0"
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    import torch

    _patch_torch_cuda(torch)
    _enter_mode_in_every_thread(_build_mode(torch))
    _patch_lmdeploy()
    _installed = True


def install_from_site() -> None:
    """sitecustomize's entry: a refusal ends the process with its one line."""
    try:
        install()
    except ShimRefused as e:
        print(str(e), file=sys.stderr, flush=True)
        os._exit(3)
