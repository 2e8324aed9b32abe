from tracefleet.agent.cli import main
import sys
sys.exit(main())
