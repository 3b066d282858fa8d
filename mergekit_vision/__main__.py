"""``python -m mergekit_vision``: the ``mergekit-vision`` command line."""
import sys

from .cli import main

sys.exit(main())
