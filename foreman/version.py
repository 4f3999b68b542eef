"""The version of CrowdCompute, defined here once: setup.cfg reads it (``attr:``), the worker announces it, and
``crowdcompute --version`` prints it. Standard library only, so that reading it imports nothing else."""

VERSION = "0.1.0"
