"""Hooks on LMDeploy 0.18.0's executor, inputs maker and model agent: size
the host pool, put the copy plan on each forward, build each rank's store,
run the copies around the model. Each wrapper calls LMDeploy's own function;
with the tier off they only call through.

Why each hook is safe:
- ExecutorBase._update_num_gpu_blocks: runs once in the driver after the
  GPU block count is final and before set_cache_config sends the config to
  the workers, so every rank and the scheduler see the same slot count.
- _ForwardInputsTask._build_payload: the scheduling pass for this forward is
  over; the plan only adds a field to the payload's cache_inputs.
- BaseModelAgent.build_cache_engine: the pools exist and are final.
- agent._restore_cache_checkpoint / _save_cache_checkpoint: LMDeploy calls
  them on the forward stream right before and after the model; they are
  looked up as module globals at call time, so replacing them takes effect.
- BaseModelAgent.release: engine close (Engine._loop_finally); the store
  waits for its copies and is dropped before LMDeploy releases the rest.
- BaseModelAgent.sleep / Engine.sleep: sleep releases the KV pools (wakeup
  builds new ones, possibly for new weights). The rank's store holds the
  pools, so it is dropped after LMDeploy's sleep drained the device, and the
  scheduler forgets every host entry: the new stores start empty.
"""
from __future__ import annotations

import os
from typing import Any

from .compat import STATE, apply, hooked, require_attr
from .import_hooks import when_imported
from .trie_hooks import tier_of

_WORKERS: dict[int, Any] = {}  # id(cache_engine) -> WorkerTier


def worker_for(cache_engine: Any):
    return _WORKERS.get(id(cache_engine))


def local_workers() -> list:
    return list(_WORKERS.values())


def drop_worker(cache_engine_id) -> bool:
    """Forgets a rank's store once its pools are released; True if there was one."""
    worker = _WORKERS.pop(cache_engine_id, None) if cache_engine_id is not None else None
    if worker is None:
        return False
    worker.close()
    return True


@when_imported("lmdeploy.pytorch.engine.executor.base")
def _patch_executor(module) -> None:
    def patch() -> None:
        Executor = require_attr(module, "ExecutorBase", "lmdeploy.pytorch.engine.executor.base")
        update = hooked(Executor, "_update_num_gpu_blocks", ["self", "free_mems", "cache_block_sizes", "spec_cache_config"], "ExecutorBase")

        def _update_num_gpu_blocks(self, free_mems, cache_block_sizes, spec_cache_config):
            update(self, free_mems, cache_block_sizes, spec_cache_config)
            from .engine_setup import size_host_pool

            size_host_pool(self.cache_config, [c.target for c in cache_block_sizes], spec_cache_config,
                           memory_model_cache=any(getattr(c, "memory", 0) for c in cache_block_sizes),
                           model_paradigm=getattr(getattr(self, "model_config", None), "model_paradigm", "ar"))

        STATE.patcher.setattr(Executor, "_update_num_gpu_blocks", _update_num_gpu_blocks)

    apply("executor.sizing", patch)


@when_imported("lmdeploy.pytorch.engine.inputs_maker")
def _patch_inputs_maker(module) -> None:
    def patch() -> None:
        Task = require_attr(module, "_ForwardInputsTask", "lmdeploy.pytorch.engine.inputs_maker")
        build = hooked(Task, "_build_payload", ["self"], "_ForwardInputsTask")

        def _build_payload(self):
            payload = build(self)
            tier = tier_of(self.scheduler)
            if tier is not None and (payload.get("inputs") is not None or payload.get("delta") is not None):
                from .copy_plan import HostCacheInputs

                plan = tier.take_plan(payload["running"])
                payload["cache_inputs"] = HostCacheInputs.wrap(payload.get("cache_inputs"), plan)
            return payload

        STATE.patcher.setattr(Task, "_build_payload", _build_payload)

    apply("inputs_maker.plan", patch)


@when_imported("lmdeploy.pytorch.engine.model_agent.agent")
def _patch_agent(module) -> None:
    def patch() -> None:
        restore = hooked(module, "_restore_cache_checkpoint", ["inputs", "cache_inputs", "cache_engine", "state_cache_engine"], "agent")
        save = hooked(module, "_save_cache_checkpoint", ["inputs", "cache_inputs", "cache_engine", "state_cache_engine"], "agent")
        Agent = require_attr(module, "BaseModelAgent", "agent")
        build = hooked(Agent, "build_cache_engine", ["self"], "BaseModelAgent")
        agent_sleep = hooked(Agent, "sleep", ["self", "level"], "BaseModelAgent")
        agent_release = hooked(Agent, "release", ["self"], "BaseModelAgent")

        def _current_stream(worker):
            if not worker.cuda:
                return None
            import torch

            return torch.cuda.current_stream()

        def _restore_cache_checkpoint(inputs, cache_inputs, cache_engine, state_cache_engine):
            worker = worker_for(cache_engine)
            if worker is not None and not inputs.is_dummy:
                worker.before_model(getattr(cache_inputs, "host_plan", None), _current_stream(worker))
            return restore(inputs, cache_inputs, cache_engine, state_cache_engine)

        def _save_cache_checkpoint(inputs, cache_inputs, cache_engine, state_cache_engine):
            result = save(inputs, cache_inputs, cache_engine, state_cache_engine)
            worker = worker_for(cache_engine)
            if worker is not None and not inputs.is_dummy:
                worker.after_model(getattr(cache_inputs, "host_plan", None), _current_stream(worker))
            return result

        def build_cache_engine(self):
            # A rebuild without sleep (wakeup of a never-slept agent): the old
            # store must not keep the replaced pools alive.
            drop_worker(self.__dict__.pop("_hc_worker_key", None))
            build(self)
            from .engine_setup import build_rank_store

            worker = build_rank_store(self)
            if worker is not None:
                _WORKERS[id(self.cache_engine)] = worker
                self._hc_worker_key = id(self.cache_engine)

        async def sleep(self, level: int = 1):
            result = await agent_sleep(self, level)
            key = self.__dict__.pop("_hc_worker_key", None)
            # LMDeploy synchronized the device and emptied its cache while our
            # store still held the pools: drop it and empty the cache again,
            # or wakeup allocates a second KV cache next to the first.
            if key is not None and drop_worker(key):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            return result

        def release(self):
            # Engine close: the rank's store (its copies finished first) goes
            # with the agent, or a process that builds engines one after
            # another keeps every closed engine's host pool alive.
            drop_worker(self.__dict__.pop("_hc_worker_key", None))
            return agent_release(self)

        STATE.patcher.setattr(module, "_restore_cache_checkpoint", _restore_cache_checkpoint)
        STATE.patcher.setattr(module, "_save_cache_checkpoint", _save_cache_checkpoint)
        STATE.patcher.setattr(Agent, "build_cache_engine", build_cache_engine)
        STATE.patcher.setattr(Agent, "sleep", sleep)
        STATE.patcher.setattr(Agent, "release", release)

    apply("agent.copies", patch)


@when_imported("lmdeploy.pytorch.engine.engine")
def _patch_engine(module) -> None:
    def patch() -> None:
        Engine = require_attr(module, "Engine", "lmdeploy.pytorch.engine.engine")
        engine_sleep = hooked(Engine, "sleep", ["self", "level"], "Engine")

        async def sleep(self, level: int = 1):
            result = await engine_sleep(self, level)
            tier = tier_of(getattr(self, "scheduler", None))
            if tier is not None:
                tier.reset()  # the ranks dropped their stores with the pools
            return result

        STATE.patcher.setattr(Engine, "sleep", sleep)

    apply("engine.sleep", patch)


def copy_path() -> str:
    """HOSTCACHE_COPY_PATH=memcpy selects the batched-memcpy path."""
    return os.environ.get("HOSTCACHE_COPY_PATH", "kernel")


def pin_mode() -> str:
    """HOSTCACHE_PIN=eager registers the whole pool at start-up (seconds per
    tens of GiB) instead of a 256 MiB chunk at a time while serving (lazy)."""
    return os.environ.get("HOSTCACHE_PIN", "lazy")
