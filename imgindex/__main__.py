"""``python -m imgindex`` runs the command-line interface."""

from imgindex.cli import main

main()
