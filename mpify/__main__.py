"""`python -m mpify` is the same as the `mpify` console script."""
from mpify.cli.app import main

if __name__ == "__main__":
    main()
