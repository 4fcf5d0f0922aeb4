"""Removal and ambiguity attacks against ownership evidence, and the robustness benchmark."""
