import sys

from dynamo_ext.cli import main

sys.exit(main())
