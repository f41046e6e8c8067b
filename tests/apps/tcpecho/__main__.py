import sys

from tests.apps.tcpecho.server import main

sys.exit(main())
