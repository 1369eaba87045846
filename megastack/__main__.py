import sys

from megastack.cli import main

sys.exit(main())
