"""Loads test support into every interpreter started with this folder on
PYTHONPATH (tests/engine/conftest.py engine_env() does it for the engine
processes, and they pass it on to what they spawn, such as the API server's
engine process). Not a .pth file: Python reads those only from site
directories, so one would have to be installed beside the package, where
it would load into every process of the machine.

  HOSTCACHE_TEST_LMDEPLOY_ON_CPU=1  lmdeploy_on_cpu: the real engine without a GPU
  HOSTCACHE_TEST_START_RACE=1       lmdeploy_start_race: LMDeploy's API-server start race
  HOSTCACHE_TEST_LOGICAL_LRU=1      lmdeploy_logical_lru: an eviction order that does not depend on speed
"""
import os

if os.environ.get("HOSTCACHE_TEST_LMDEPLOY_ON_CPU") == "1":
    import lmdeploy_on_cpu

    lmdeploy_on_cpu.install_from_site()
if os.environ.get("HOSTCACHE_TEST_START_RACE") == "1":
    import lmdeploy_start_race

    lmdeploy_start_race.install()
if os.environ.get("HOSTCACHE_TEST_LOGICAL_LRU") == "1":
    import lmdeploy_logical_lru

    lmdeploy_logical_lru.install()
