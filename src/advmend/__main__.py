import sys

from advmend.cli import main

sys.exit(main())
