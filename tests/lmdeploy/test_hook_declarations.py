"""hook.wrap on a toy module, in fresh interpreters (a refused declaration
reverts every patch of the process): each kind is installed as declared,
keeps the original's name and docstring, and a declaration of the wrong kind
or with other parameters is refused, naming the target, with all patches
reverted."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

TOY = '''
import functools

def f(a, b):
    """f's doc"""
    return a + b

def sync_decorated(fn):
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        return fn(*args, **kwargs)
    return inner

class C:
    def __init__(self):
        self._v = 1

    @staticmethod
    def s(x):
        return x * 2

    @property
    def v(self):
        return self._v

    @v.setter
    def v(self, value):
        self._v = value

    @sync_decorated
    async def sleep(self, level):
        return level
'''


def run(tmp_path, declarations: str, body: str) -> dict:
    (tmp_path / "toy_hooked.py").write_text(TOY)
    code = textwrap.dedent(f"""
        import asyncio, json, sys
        sys.path.insert(0, {str(tmp_path)!r})
        from lmdeploy_patch.compat import STATE
        from lmdeploy_patch.hook import wrap
        {textwrap.indent(textwrap.dedent(declarations), '        ').strip()}
        import toy_hooked as toy
        out = {{"enabled": STATE.enabled, "reason": STATE.reason, "applied": list(STATE.applied)}}
        {textwrap.indent(textwrap.dedent(body), '        ').strip()}
        print(json.dumps(out))
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_each_kind_is_installed_as_declared(tmp_path):
    out = run(tmp_path, '''
        @wrap("toy_hooked", "f", ["a", "b"])
        def f(original, a, b):
            return original(a, b) * 10

        @wrap("toy_hooked", "C.s", ["x"], kind="staticmethod")
        def s(original, x):
            return original(x) + 1

        @wrap("toy_hooked", "C.v", ["self"], kind="property")
        def v(original, self):
            return original(self) + 100

        @wrap("toy_hooked", "C.sleep", ["self", "level"])
        async def sleep(original, self, level):
            return (await original(self, level)) + 1000
        ''', '''
        c = toy.C()
        out["f"], out["doc"], out["s"], out["v"] = toy.f(1, 2), toy.f.__doc__, toy.C.s(3), c.v
        c.v = 5
        out["v_after_set"] = c.v
        out["sleep"] = asyncio.run(c.sleep(2))
        STATE.patcher.revert()
        out["f_reverted"], out["v_reverted"] = toy.f(1, 2), toy.C().v
        ''')
    assert out["enabled"] is True and len(out["applied"]) == 4, out
    assert (out["f"], out["doc"], out["s"], out["v"], out["v_after_set"]) == (30, "f's doc", 7, 101, 105)
    assert out["sleep"] == 1002
    assert (out["f_reverted"], out["v_reverted"]) == (3, 1)


def test_a_declaration_of_the_wrong_kind_is_refused_and_reverts_everything(tmp_path):
    out = run(tmp_path, '''
        @wrap("toy_hooked", "f", ["a", "b"])
        def f(original, a, b):
            return -1

        @wrap("toy_hooked", "C.s", ["x"])  # a staticmethod declared as a plain function
        def s(original, x):
            return -1
        ''', '''
        out["f"], out["s"] = toy.f(1, 2), toy.C.s(3)
        ''')
    assert out["enabled"] is False and "toy_hooked.C.s is a staticmethod" in out["reason"], out
    assert (out["f"], out["s"]) == (3, 6), "LMDeploy's originals must be back"


def test_other_parameters_or_a_sync_hook_on_an_async_function_are_refused(tmp_path):
    out = run(tmp_path, '''
        @wrap("toy_hooked", "f", ["a", "c"])
        def f(original, a, c):
            return -1
        ''', "")
    assert out["enabled"] is False and "toy_hooked.f has parameters ['a', 'b']" in out["reason"], out
    out = run(tmp_path, '''
        @wrap("toy_hooked", "C.sleep", ["self", "level"])
        def sleep(original, self, level):
            return -1
        ''', "")
    assert out["enabled"] is False and "disagree on being async" in out["reason"], out
