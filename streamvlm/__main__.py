import sys

from streamvlm.cli import main

sys.exit(main())
