"""Test fixtures that ship with the package: the tiny checkpoint set in the published layout."""
