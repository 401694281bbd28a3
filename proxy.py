"""The SafeEdit Guard proxy: the entry point `safeedit serve` names (`proxy:create_app`).

The app itself is built in `guard.http.app`; this module stays a thin top-level import of it.
"""

from guard.http.app import create_app, routes

__all__ = ["create_app", "routes"]
