"""lmdeploy.pytorch.engine.inputs_maker._ForwardInputsTask._build_payload:
the forward's copy plan (copy_plan.py) rides in its cache inputs. The
scheduling pass for this forward is over; the plan only adds a field.
Before it, what this process's ranks measured reaches the restore decision
(restore_decision.py)."""
from __future__ import annotations

from typing import Any, Callable

from ..hook import wrap


@wrap("lmdeploy.pytorch.engine.inputs_maker", "_ForwardInputsTask._build_payload", ["self"])
def _build_payload(original: Callable, self: Any) -> Any:
    payload = original(self)
    from ..scheduler_tier import tier_of

    tier = tier_of(self.scheduler)
    if tier is not None and (payload.get("inputs") is not None or payload.get("delta") is not None):
        from ..copy_plan import HostCacheInputs
        from ..rank_tier import local_restore_bandwidth, take_local_prefill_samples

        decider, config_id = tier.decider, id(self.scheduler.cache_config)
        if decider.copy_bytes_per_s is None:
            decider.set_copy_bandwidth(local_restore_bandwidth(config_id))
        for tokens, seconds in take_local_prefill_samples(config_id):
            decider.observe_prefill(tokens, seconds)
        plan = tier.take_plan(payload["running"])
        payload["cache_inputs"] = HostCacheInputs.wrap(payload.get("cache_inputs"), plan)
    return payload
