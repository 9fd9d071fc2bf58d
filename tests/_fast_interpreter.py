"""Triton's interpreter without its repeated patching: a kernel launch patches triton.language
for the interpreter (module attributes, a pass of inspect.getmembers over each), and so does
every call of a @triton.jit helper inside the kernel, once per program and loop iteration,
although the launch's patch is still in place. In the suite that repeated patching was ~40% of
the kernels' time. Here a helper called inside a launch whose patch covers the helper's module
is not patched again; the launch's own patch and restore are Triton's. What the kernels compute
is unchanged (the interpreter runs the same code on the same patched module).

Imported by tests/conftest.py and the forked ranks' server where TRITON_INTERPRET=1; a Triton
whose interpreter lacks these internals is left as it is.
"""

from __future__ import annotations


def install() -> bool:
    try:
        import triton.runtime.interpreter as ti

        patch, executor, scope = ti._patch_lang, ti.GridExecutor, ti._LangPatchScope
    except (ImportError, AttributeError):
        return False
    if getattr(patch, "peer_once", False):
        return True
    state = {"depth": 0, "patched": None}  # launches in progress; globals their patch covers

    def patch_lang(fn):
        if state["depth"] and state["patched"] is fn.__globals__:
            return scope()  # nothing to restore: the launch's patch stays until it ends
        done = patch(fn)
        if state["depth"]:
            state["patched"] = fn.__globals__
        return done

    launch = executor.__call__

    def call(self, *args, **kwargs):
        outer = state["patched"]
        state["depth"] += 1
        state["patched"] = None
        try:
            return launch(self, *args, **kwargs)
        finally:
            state["depth"] -= 1
            state["patched"] = outer

    patch_lang.peer_once = True
    ti._patch_lang = patch_lang
    executor.__call__ = call
    return True


if __import__("os").environ.get("TRITON_INTERPRET") == "1":
    install()
