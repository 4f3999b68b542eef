"""The chaos suite (issue 6): a large job on a fleet that is killed, frozen, partitioned and grown at random.

A package (with this ``__init__``) so that its ``conftest.py`` is imported as ``chaos.conftest`` and does not
displace ``tests/conftest.py``, which other test modules import as plain ``conftest``.
"""
