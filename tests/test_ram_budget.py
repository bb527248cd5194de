"""The RAM a host pool is checked against (src/turbomind_ext/memory_info.h):
the smaller of MemAvailable and this process's cgroup limits less their use,
read from fake /proc and /sys/fs/cgroup trees."""
from __future__ import annotations

import os

from lmdeploy_hostcache import ram_budget

GiB = 1 << 30


def tree(tmp_path, meminfo_gib: float, cgroup: str, files: dict[str, str]) -> tuple[str, str]:
    proc, cg = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: 99999999 kB\nMemAvailable: {int(meminfo_gib * GiB) // 1024} kB\n")
    (proc / "self" / "cgroup").write_text(cgroup)
    for path, text in files.items():
        p = cg / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    os.makedirs(cg, exist_ok=True)
    return str(proc), str(cg)


def test_meminfo_alone(tmp_path):
    proc, cg = tree(tmp_path, 12, "0::/\n", {})
    n, source = ram_budget(proc, cg)
    assert n == 12 * GiB and "MemAvailable" in source


def test_cgroup_v2_limit_less_its_use_applies(tmp_path):
    files = {"app/memory.max": f"{8 * GiB}\n", "app/memory.current": f"{3 * GiB}\n",
             "app/memory.stat": f"anon 1\ninactive_file {1 * GiB}\nactive_file 5\n"}
    proc, cg = tree(tmp_path, 64, "0::/app\n", files)
    n, source = ram_budget(proc, cg)
    # 8 GiB limit, 3 GiB used of which 1 GiB is reclaimable page cache: 6 GiB
    assert n == 6 * GiB, n / GiB
    assert "cgroup v2" in source and "memory.max" in source and "/app" in source


def test_a_parent_limit_and_unlimited_leaves(tmp_path):
    files = {"a/memory.max": f"{4 * GiB}\n", "a/memory.current": f"{1 * GiB}\n",
             "a/b/memory.max": "max\n", "a/b/memory.current": f"{1 * GiB}\n"}
    proc, cg = tree(tmp_path, 64, "0::/a/b\n", files)
    n, source = ram_budget(proc, cg)
    assert n == 3 * GiB and source.endswith(")") and "/a (" in source, source


def test_meminfo_wins_when_smaller(tmp_path):
    files = {"memory.max": f"{32 * GiB}\n", "memory.current": "0\n"}  # a namespaced container: path "/"
    proc, cg = tree(tmp_path, 5, "0::/\n", files)
    n, source = ram_budget(proc, cg)
    assert n == 5 * GiB and "MemAvailable" in source


def test_cgroup_v1_memory_controller(tmp_path):
    files = {"memory/docker/x/memory.limit_in_bytes": f"{2 * GiB}\n",
             "memory/docker/x/memory.usage_in_bytes": f"{GiB}\n",
             "memory/docker/x/memory.stat": f"cache 1\ntotal_inactive_file {GiB // 2}\n",
             "memory/memory.limit_in_bytes": "9223372036854771712\n"}  # v1's "unlimited"
    proc, cg = tree(tmp_path, 64, "4:memory:/docker/x\n3:cpu,cpuacct:/docker/x\n0::/\n", files)
    n, source = ram_budget(proc, cg)
    assert n == 2 * GiB - GiB // 2 and "cgroup v1" in source and "memory.limit_in_bytes" in source


def test_a_cgroup_over_its_limit_leaves_nothing(tmp_path):
    files = {"app/memory.max": f"{GiB}\n", "app/memory.current": f"{2 * GiB}\n"}
    proc, cg = tree(tmp_path, 64, "0::/app\n", files)
    assert ram_budget(proc, cg)[0] == 0


def test_this_machine():
    n, source = ram_budget()
    assert n > 0 and source


def test_mounts_come_from_mountinfo(tmp_path):
    """A v1 memory controller co-mounted elsewhere, showing the container's own
    cgroup as its root (docker without a cgroup namespace)."""
    mount = tmp_path / "elsewhere" / "cpu,memory"
    files = {}
    proc, cg = tree(tmp_path, 64, "5:cpu,memory:/docker/abc\n", files)
    mount.mkdir(parents=True)
    (mount / "memory.limit_in_bytes").write_text(f"{3 * GiB}\n")
    (mount / "memory.usage_in_bytes").write_text(f"{GiB}\n")
    (tmp_path / "proc" / "self" / "mountinfo").write_text(
        "22 1 0:20 / /proc rw - proc proc rw\n"
        f"30 25 0:26 /docker/abc {mount} rw,nosuid shared:9 - cgroup cgroup rw,cpu,memory\n")
    n, source = ram_budget(proc, cg)
    assert n == 2 * GiB and str(mount) in source, source


def test_escaped_mount_points_and_the_closest_root(tmp_path):
    """mountinfo escapes a space as \\040; of two mounts of the hierarchy the
    one whose root shows the process's cgroup most closely is read; a cgroup
    no mount shows is not read at all."""
    real = tmp_path / "my cg"
    other = tmp_path / "other"
    for d, limit in ((real / "app", 4), (other, 1)):
        d.mkdir(parents=True)
        (d / "memory.max").write_text(f"{limit * GiB}\n")
        (d / "memory.current").write_text("0\n")
    proc, cg = tree(tmp_path, 64, "0::/app\n", {})
    mounts = (f"40 1 0:30 /elsewhere {other} rw - cgroup2 cgroup2 rw\n"
              f"41 1 0:30 / {str(real).replace(' ', chr(92) + '040')} rw - cgroup2 cgroup2 rw\n")
    (tmp_path / "proc" / "self" / "mountinfo").write_text(mounts)
    n, source = ram_budget(proc, cg)
    assert n == 4 * GiB and "my cg" in source, source
    (tmp_path / "proc" / "self" / "cgroup").write_text("0::/sibling/x\n")  # shown by no mount but "/"
    (tmp_path / "proc" / "self" / "mountinfo").write_text(f"40 1 0:30 /elsewhere {other} rw - cgroup2 cgroup2 rw\n")
    assert ram_budget(proc, cg) == (64 * GiB, f"MemAvailable in {proc}/meminfo")
