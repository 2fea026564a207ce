import sys

from llamita.cli import main

sys.exit(main())
