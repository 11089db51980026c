"""``python -m sagas`` runs the CLI."""

from ._cli import main

main()
