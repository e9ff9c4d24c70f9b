import sys

from ctxforge.cli import main

sys.exit(main())
