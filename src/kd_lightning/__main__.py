"""``python -m kd_lightning`` is ``kd``."""

from kd_lightning.cli import main

if __name__ == "__main__":
    main()
