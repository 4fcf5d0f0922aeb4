"""Fuzzing the command line with hostile inputs (issue 13, "Hardening").

`generators` makes the inputs (hand-written hostile cases and seeded mutations of valid files),
`harness` runs each through the real CLI in a subprocess under a time and memory budget and
classifies what happened. `tests/test_fuzz.py` runs them under pytest, `scripts/fuzz.py` alone.
"""
