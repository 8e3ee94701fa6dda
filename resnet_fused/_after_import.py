"""Registrations with optional libraries, made right after their first import so that ``import resnet_fused``
imports none of them itself."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable


class AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback`` once, right after the module ``name`` is first imported (its own body done).

    It stays on ``sys.meta_path`` until then: a lookup that imports nothing (``importlib.util.find_spec``, as code
    checking whether a package is installed calls it) gets a spec whose loader is discarded, so the hook must still
    be there for the real import. A callback that fails warns with ``failure`` (what then does not work): it must not
    break the import it rides on, nor ``import resnet_fused``.
    """

    def __init__(self, name: str, callback: Callable[[], None], failure: str) -> None:
        self.name, self.callback, self.failure = name, callback, failure
        self._looking = False  # the lookup below must not find this finder again

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name or self._looking:
            return None
        self._looking = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._looking = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_call(module) -> None:
            exec_module(module)
            if self not in sys.meta_path:
                return  # another spec's loader already ran the callback
            sys.meta_path.remove(self)
            _call(self.callback, self.failure)

        spec.loader.exec_module = exec_then_call
        return spec


def _call(callback: Callable[[], None], failure: str) -> None:
    try:
        callback()
    except Exception as e:
        warnings.warn(f"resnet_fused: {failure} ({type(e).__name__}: {e})", stacklevel=3)


def when_imported(name: str, callback: Callable[[], None], failure: str) -> None:
    """``callback()`` now if ``name`` is imported already, else right after its first import; never if it is not
    installed. A failing callback warns with ``failure``."""
    if name in sys.modules:
        _call(callback, failure)
    elif importlib.util.find_spec(name) is not None:
        sys.meta_path.insert(0, AfterImport(name, callback, failure))
