import sys

from qsweep.cli import main

sys.exit(main())
