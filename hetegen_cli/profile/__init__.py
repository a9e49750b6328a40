"""The hardware profile document: schema, load, save, identity (the measuring is in
`measure`).

May import: `core` only (never `models`); pure Python (no torch).
"""
