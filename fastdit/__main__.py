import sys

from fastdit.cli import main

sys.exit(main())
