"""The command line and the supervised stack: the top layer, free to import every other package."""
