"""``python -m devbroker``: run a throwaway Kafka broker until Ctrl-C (see :func:`devbroker.main`)."""

from .cli import main

raise SystemExit(main())
