import sys

from onnxfgq.cli import main

sys.exit(main())
