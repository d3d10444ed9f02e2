"""Import PyKMIP safely against newer ``cryptography`` and SQLAlchemy releases.

PyKMIP 0.11 uses legacy ciphers and modes (TripleDES, Blowfish, CAST5, IDEA,
ARC4, Camellia, OFB, CFB...) under ``cryptography.hazmat.primitives``, which
``cryptography`` moved to ``cryptography.hazmat.decrepit`` and serves from the
old place only through a deprecation shim, to be removed.  Before PyKMIP is
imported, every name the decrepit modules hold and the primitives modules no
longer define is bound there directly, so neither a warning nor (after the
shim's removal) an ImportError or AttributeError can come of it.  Other
import-time warnings of PyKMIP (SQLAlchemy 2 deprecations) are silenced.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

from .errors import KmsConfigError

_MOVED = (("cryptography.hazmat.primitives.ciphers.algorithms",
           "cryptography.hazmat.decrepit.ciphers.algorithms"),
          ("cryptography.hazmat.primitives.ciphers.modes",
           "cryptography.hazmat.decrepit.ciphers.modes"))


def _restore_moved_names() -> None:
    for old_name, new_name in _MOVED:
        try:
            old, new = importlib.import_module(old_name), importlib.import_module(new_name)
        except ImportError:  # pragma: no cover - depends on the installed release
            continue
        for name, value in vars(new).items():
            if isinstance(value, type) and not name.startswith("_") and name not in vars(old):
                setattr(old, name, value)


def load(module: str) -> ModuleType:
    """Import a PyKMIP module (``kmip.pie.client``...), or say why it cannot be."""
    _restore_moved_names()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return importlib.import_module(module)
        except Exception as exc:  # ImportError, AttributeError from a moved name...
            raise KmsConfigError(
                f"PyKMIP cannot be imported ({module}: {type(exc).__name__}: {exc}); "
                "install the versions pinned in setup.cfg") from exc
