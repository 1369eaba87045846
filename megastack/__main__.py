import sys

from megastack.cli import console_main

sys.exit(console_main())
