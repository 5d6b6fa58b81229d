"""``python -m mechscope``: the same as the ``mechscope`` command."""

from mechscope.apps.cli import main

raise SystemExit(main())
