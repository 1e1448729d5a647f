"""``python -m conftok.tagging``: runs :func:`conftok.tagging.main`.

A package's ``__main__`` rather than the module itself, because ``import conftok`` imports
``conftok.tagging``: runpy would run that module a second time as ``__main__`` (and warn so).
"""

import sys

from conftok.tagging import main

sys.exit(main())
