"""``torchrun --nproc-per-node N -m disttrain.launcher [train flags]``."""

import sys

from disttrain.launcher.worker import main

if __name__ == "__main__":
    sys.exit(main())
