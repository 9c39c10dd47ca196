"""python -m service: load config from the environment and serve (or run a
subcommand; see service/cli/)."""

import sys

from service.cli import main

sys.exit(main())
