import sys

from adamergex_peft.cli import main

sys.exit(main())
