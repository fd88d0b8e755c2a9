"""`python -m mesh402.cli`: the same command line as the `mesh402` script."""

from mesh402.cli.main import main

main()
