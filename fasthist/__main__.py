"""``python -m fasthist``: the same command as the ``fasthist`` console script."""

from .cli import main

raise SystemExit(main())
