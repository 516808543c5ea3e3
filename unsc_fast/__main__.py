import sys

from unsc_fast.cli import main

sys.exit(main())
