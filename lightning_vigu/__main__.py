"""``python -m lightning_vigu {fit,validate,test,generate,caption,export} ...``"""

import sys

from lightning_vigu.cli import main
from lightning_vigu.runs import CheckpointError, RunFolderError

if __name__ == "__main__":
    try:
        main()
    except (RunFolderError, CheckpointError) as exn:  # the message names the file and the fix
        print(f"error: {exn}", file=sys.stderr)
        sys.exit(2)
