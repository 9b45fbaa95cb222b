"""`python -m sdpgo_timm.data export BENCHMARK OUT ...`: see `sdpgo_timm.data.export`."""
import sys

from .export import main

sys.exit(main())
