"""The Typer command line: the app, shared option declarations, one module per command.

May import: anything in hetegen; nothing imports `cli` but `__main__`.
"""
