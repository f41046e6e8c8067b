import sys

from tests.apps.httpecho.server import main

sys.exit(main())
