"""``python -m aotpack`` is the ``aotpack`` command.

May not: do anything but call the CLI's ``main``."""
from aotpack_cli.main import main

main()
