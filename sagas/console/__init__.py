"""The web console (``sagas console``): pages and a JSON API over :class:`sagas.operations.Operations`.

Needs the ``console`` extra (``pip install 'kombu-sagas[console]'``); nothing else in the package
imports it.
"""

from __future__ import annotations

from ._app import create_app

__all__ = ["create_app"]
