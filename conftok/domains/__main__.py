"""``python -m conftok.domains``: runs :func:`conftok.domains.main`.

A package's ``__main__`` rather than the module itself, because ``import conftok`` imports
``conftok.domains``: runpy would run that module a second time as ``__main__`` (and warn so).
"""

import sys

from conftok.domains import main

sys.exit(main())
