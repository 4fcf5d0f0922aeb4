"""Reading evidence back from a suspect model, the statistics behind it, and verdicts."""
