"""``python -m dprp_surgery``: the ``dprp`` command line."""

from .cli.app import main

if __name__ == "__main__":
    main()
