"""``python -m revelio``: the same as the ``revelio`` command."""

from .cli import main

raise SystemExit(main())
