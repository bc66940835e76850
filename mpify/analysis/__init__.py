"""Notebook analysis: notebook -> statements -> dependency graph -> slice. Pure: reads text, runs nothing."""
