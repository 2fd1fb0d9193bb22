"""``python -m aotpack`` is the ``aotpack`` command."""
from aotpack_cli.main import main

main()
