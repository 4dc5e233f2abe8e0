"""Data: behaviour datasets (labelled completions) and the reference text corpus."""
