"""Loads lmdeploy_on_cpu (test support) into every interpreter started with
this folder on PYTHONPATH and HOSTCACHE_TEST_LMDEPLOY_ON_CPU=1: the engine
tests' own processes and whatever they spawn (the API server's engine
process). A .pth file cannot do it: it runs before site-packages, where
torch and LMDeploy live, are on sys.path."""
import os

if os.environ.get("HOSTCACHE_TEST_LMDEPLOY_ON_CPU") == "1":
    import lmdeploy_on_cpu

    lmdeploy_on_cpu.install_from_site()
