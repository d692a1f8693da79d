import sys

from pacsrl.cli import main

sys.exit(main())
