"""``python -m revffn_fx``: the ``revffn`` command."""

from revffn_fx.cli import main

if __name__ == "__main__":
    main()
