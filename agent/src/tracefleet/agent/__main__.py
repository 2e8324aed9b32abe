import sys

from tracefleet.agent.cli import main

sys.exit(main())
