"""The `mpify` command line: thin typer commands over the analysis, export and engine rooms."""
