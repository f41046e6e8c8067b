import sys

from tests.apps.echo.server import main

sys.exit(main())
