"""``python -m fasthist.cli``: the same command as the ``fasthist`` console script."""

from .app import main

raise SystemExit(main())
