import sys

from headavatar.cli.main import main

sys.exit(main())
