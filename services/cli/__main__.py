"""``python -m services.cli``: the ``shoal`` command line."""

from services.cli import main

main()
