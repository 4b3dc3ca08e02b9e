"""Shared fixtures: small synthetic slides built with the project's own generator."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
