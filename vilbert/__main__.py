"""`python -m vilbert` (and `torchrun -m vilbert`) runs the CLI."""

from vilbert.cli.app import main

if __name__ == "__main__":
    main()
