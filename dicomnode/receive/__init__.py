"""Receiving: association policy, C-ECHO / C-STORE handlers, header checks, storage and start-up recovery.

The receive path never imports torch or the model: ingest never waits on inference.
"""
