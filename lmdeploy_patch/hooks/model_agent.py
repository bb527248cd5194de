"""lmdeploy.pytorch.engine.model_agent.agent: each rank's store (rank_tier.py)
is built with the KV pools, runs the plan's copies around the model, and goes
with the pools on sleep and on close.

Why safe: _restore_cache_checkpoint / _save_cache_checkpoint are called by
LMDeploy on the forward stream right before and after the model, looked up
as module globals at call time (prefill forwards are timed between them,
by host clock on CPU and CUDA events on a GPU: nothing waits on them); build_cache_engine: the pools exist and are
final; sleep releases the pools (wakeup builds new ones, possibly for new
weights), so the store that holds them is dropped after LMDeploy's sleep
drained the device; release (engine close, Engine._loop_finally): the store
waits for its copies and is dropped before LMDeploy releases the rest, or a
process that builds engines one after another keeps every closed engine's
host pool alive; update_params / update_weights_*: before the weights
change, this engine stops using the Mooncake Store (store_tier.py), whose
keys would go on naming the old weights."""
from __future__ import annotations

from typing import Any, Callable

from ..hook import wrap

AGENT = "lmdeploy.pytorch.engine.model_agent.agent"
CHECKPOINT_PARAMS = ["inputs", "cache_inputs", "cache_engine", "state_cache_engine"]


def _current_stream(worker: Any) -> Any:
    if not worker.cuda:
        return None
    import torch

    return torch.cuda.current_stream()


@wrap(AGENT, "_restore_cache_checkpoint", CHECKPOINT_PARAMS)
def _restore_cache_checkpoint(original: Callable, inputs: Any, cache_inputs: Any, cache_engine: Any,
                              state_cache_engine: Any) -> Any:
    from ..rank_tier import worker_for

    worker = worker_for(cache_engine)
    if worker is None or inputs.is_dummy:
        return original(inputs, cache_inputs, cache_engine, state_cache_engine)
    stream = _current_stream(worker)
    worker.before_model(getattr(cache_inputs, "host_plan", None), stream)
    result = original(inputs, cache_inputs, cache_engine, state_cache_engine)
    # Timed from here to _save_cache_checkpoint: the model alone (the restore
    # decision learns this engine's prefill rate from it).
    ids = getattr(inputs, "input_ids", None)
    worker.forward_starts(int(ids.numel()) if ids is not None else 0, not getattr(inputs, "is_decoding", True),
                          stream)
    return result


@wrap(AGENT, "_save_cache_checkpoint", CHECKPOINT_PARAMS)
def _save_cache_checkpoint(original: Callable, inputs: Any, cache_inputs: Any, cache_engine: Any,
                           state_cache_engine: Any) -> Any:
    result = original(inputs, cache_inputs, cache_engine, state_cache_engine)
    from ..rank_tier import worker_for

    worker = worker_for(cache_engine)
    if worker is not None and not inputs.is_dummy:
        stream = _current_stream(worker)
        worker.forward_ends(stream)
        worker.after_model(getattr(cache_inputs, "host_plan", None), stream)
    return result


@wrap(AGENT, "BaseModelAgent.build_cache_engine", ["self"])
def build_cache_engine(original: Callable, self: Any) -> Any:
    from ..rank_tier import attach_to_agent, drop_from_agent

    drop_from_agent(self)  # a rebuild without sleep (wakeup of a never-slept agent)
    result = original(self)
    attach_to_agent(self)
    return result


@wrap(AGENT, "BaseModelAgent.sleep", ["self", "level"])
async def sleep(original: Callable, self: Any, level: int = 1) -> Any:
    result = await original(self, level)
    from ..rank_tier import drop_from_agent

    # LMDeploy synchronized the device and emptied its cache while our
    # store still held the pools: drop it and empty the cache again,
    # or wakeup allocates a second KV cache next to the first.
    if drop_from_agent(self):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def _weights_changed(agent: Any) -> None:
    from ..rank_tier import weights_changed

    weights_changed(agent)


# The store's keys name the model by its name and config, not its weights
# (docs/store_tier.md): once they change in place, this engine's blocks are
# no longer what other engines of that name compute, nor theirs its.
@wrap(AGENT, "BaseModelAgent.update_params", ["self", "request"])
def update_params(original: Callable, self: Any, request: Any) -> Any:
    _weights_changed(self)
    return original(self, request)


@wrap(AGENT, "BaseModelAgent.update_weights_from_ipc", ["self", "request", "reject_reason"])
def update_weights_from_ipc(original: Callable, self: Any, request: Any, reject_reason: Any = None) -> Any:
    _weights_changed(self)
    return original(self, request, reject_reason)


@wrap(AGENT, "BaseModelAgent.update_weights_from_distributed", ["self", "request"])
def update_weights_from_distributed(original: Callable, self: Any, request: Any) -> Any:
    _weights_changed(self)
    return original(self, request)


@wrap(AGENT, "BaseModelAgent.release", ["self"])
def release(original: Callable, self: Any) -> Any:
    from ..rank_tier import drop_from_agent

    drop_from_agent(self)
    return original(self)
