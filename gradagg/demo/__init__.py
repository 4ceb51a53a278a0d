"""The ``python -m gradagg demo`` program."""
