import sys

from dist_train.cli import main

sys.exit(main())
