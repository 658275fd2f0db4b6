"""``python -m cablebench``: run the broadcast benchmark."""

from __future__ import annotations

import sys

from cablebench.cli import main

sys.exit(main())
