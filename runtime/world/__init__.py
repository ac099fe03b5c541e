"""The world agents live in: artifacts (``store/``), the event log (``events/``), vector memory
(``memory/``), and ``World`` (``world``), the one agent-facing surface over them, which serves confined
code's calls (``invoke``)."""
