"""`python -m zimage_batch` runs the same command as `zimage-batch`."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
