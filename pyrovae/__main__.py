"""``python -m pyrovae`` (and ``torchrun -m pyrovae``) run the command line."""

import sys

from .cli import main

sys.exit(main())
