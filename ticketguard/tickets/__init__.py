"""Tickets: masks, the ticket file format, loading checkpoints, models, data and finding tickets."""
