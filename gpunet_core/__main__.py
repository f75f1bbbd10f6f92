"""``python -m gpunet_core`` is the ``gpunet`` CLI."""

import sys

from gpunet_core.cli import main

sys.exit(main())
