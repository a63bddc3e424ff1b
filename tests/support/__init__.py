"""Helpers the tests share: golden cases, media writers and readers, the local tools they check against."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
