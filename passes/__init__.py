"""modec's passes, one per module; importing this package registers all of them.

Pass modules keep their heavy imports (torch, python-mip, TVM) inside ``run`` so that
registering them stays cheap.
"""

from __future__ import annotations

import importlib
import pkgutil


def load_all() -> list[str]:
    """Import every pass module of this package (registering its passes)."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names


load_all()
