"""Ownership evidence written into tickets: keys, credentials, topology signatures, trigger sets."""
