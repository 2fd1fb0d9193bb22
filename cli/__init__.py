"""The ``aotpack`` command line.

May not: hold logic: the commands are in ``main``."""
