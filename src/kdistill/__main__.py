"""``python -m kdistill`` (also what ``torchrun -m kdistill`` runs)."""

import sys

from kdistill.cli import main

sys.exit(main())
