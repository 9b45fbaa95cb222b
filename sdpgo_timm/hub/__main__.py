"""`python -m sdpgo_timm.hub push CHECKPOINT REPO_ID`: see `sdpgo_timm.hub.push.main`."""
import sys

from .push import main

sys.exit(main())
