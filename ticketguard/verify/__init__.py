"""Reading evidence back from a suspect model, the statistics behind it, and verdicts.

`ticketguard.verify(...)` is the public verification call, but this sub-package has the same
name, and importing it rebinds `ticketguard.verify` to the package. The package is therefore
callable: calling it runs `ticketguard.api.verify`, so both spellings mean the same thing.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    """A module that forwards calls to `ticketguard.api.verify`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from ticketguard.api import verify

        return verify(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
