import sys

from unsc_fast.evaluation.cli import main

sys.exit(main())
