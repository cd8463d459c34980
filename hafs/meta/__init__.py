"""Metadata engines behind one interface (see DESIGN.md, "Metadata engines")."""
