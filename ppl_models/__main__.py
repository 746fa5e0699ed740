"""``python -m ppl_models``: the ``pplm`` command line (see :mod:`ppl_models.cli`)."""

import sys

from .cli import main

sys.exit(main())
