"""Helpers of the ``attention-dispatch`` command (argument types, ``info``)."""
