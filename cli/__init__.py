"""The ``aotpack`` command line."""
