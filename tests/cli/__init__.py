"""The command line (mesh402.cli): payment flags, and the README's commands run as written."""
