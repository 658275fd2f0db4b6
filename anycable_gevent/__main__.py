"""``python -m anycable_gevent`` runs the command-line entry point."""

from anycable_gevent.cli import main

if __name__ == "__main__":
    main()
