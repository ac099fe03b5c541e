"""What the runtime finds under it: the machine's cgroups and limits (``cgroups``, ``limits``), and the
servers a shared deployment connects to (``postgres``, with ``retry``'s back-off).

The lowest layer with ``runtime.protocol``, ``runtime.errors`` and ``runtime.config``: workers may import
``cgroups`` (it holds no supervisor state).
"""
