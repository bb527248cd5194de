from lmdeploy_hostcache import build_info


def test_build_info_states_build_and_gpu():
    info = build_info()
    assert info["build"] in ("cuda", "cpu")
    assert info["build"] == ("cuda" if info["cuda_compiled"] else "cpu")
    assert isinstance(info["gpu_usable"], bool)
    if not info["gpu_usable"]:
        assert info["reason"], "a missing GPU must be explained"
        assert info["device_count"] == 0
    else:
        assert info["device_count"] > 0 and info["reason"] == ""
