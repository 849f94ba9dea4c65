"""``python -m kvlog``: the same as the ``kvlog`` command."""

from .cli import main

raise SystemExit(main())
