"""Charging and recording: the ledger (``ledger/``), agents' token buckets (``buckets``), opening
accounts with their rights (``rights``), charging every task's measured cost (``charging``) and
charging, after a crash, the tasks that were in flight (``recovery``)."""
