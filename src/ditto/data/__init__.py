"""Small evaluation samples shipped with ditto (GSM8K, MATH-500); see README.md in this folder."""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
