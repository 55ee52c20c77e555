"""Fault injection for the tests' training ranks: put this directory on PYTHONPATH and set

    PIPELINE_FAULT="<module>:<attribute>:<rank>:<what>[:<after>]"

and the rank whose RANK is <rank> wraps ``<module>.<attribute>`` (a function, or ``Class.method``):
``what`` = ``enospc`` raises OSError(ENOSPC) (a full disk), ``error`` raises RuntimeError, ``sleep<N>``
sleeps N seconds (a straggler), ``hang`` sleeps for good; each from the ``after``-th call on (default
1) and once. The pipeline itself carries no fault hooks: this file exists only in tests/.
"""

import os

_SPEC = os.environ.get("PIPELINE_FAULT")


def _install(spec: str) -> None:
    import errno
    import functools
    import importlib
    import sys
    import time

    module_name, attr, rank, what, *rest = spec.split(":")
    if os.environ.get("RANK", "0") != rank:
        return
    after = int(rest[0]) if rest else 1
    owner = importlib.import_module(module_name)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = [0]

    @functools.wraps(original)
    def faulty(*args, **kwargs):
        calls[0] += 1
        if calls[0] == after:
            print(f"[fault injected] {spec} on call {after} at {time.time()}", file=sys.stderr, flush=True)
            if what == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"<{attr}>")
            if what == "error":
                raise RuntimeError(f"injected failure in {attr}")
            time.sleep(float(what[5:]) if what.startswith("sleep") else 10**6)
        return original(*args, **kwargs)

    setattr(owner, name, faulty)


if _SPEC:
    _install(_SPEC)
