"""Test helpers for the smtp-relay integration tests: an upstream sink, the relay process, SMTP clients."""
