import sys

from streamvlm.train.cli import main

sys.exit(main())
