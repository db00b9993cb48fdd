"""``python -m posttrain``: the same command line as ``posttrain`` (and what ``torchrun``/``accelerate launch -m`` run)."""

import sys

from posttrain.cli import main

sys.exit(main())
