"""python -m fedclinic.cli ..."""

import sys

from fedclinic.cli import main

sys.exit(main())
