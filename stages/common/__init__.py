"""Helpers shared by data stages (input reading with quarantine of bad records)."""
