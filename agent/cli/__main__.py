"""`python -m bulkhead.cli ARGS` is the `bulkhead` command."""
import sys

from bulkhead.cli.main import main

sys.exit(main())
