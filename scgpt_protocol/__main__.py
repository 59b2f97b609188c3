"""``python -m scgpt_protocol``: the command line (also what ``torchrun ... -m scgpt_protocol finetune`` runs)."""

import sys

from .protocol.run.cli import main

sys.exit(main())
