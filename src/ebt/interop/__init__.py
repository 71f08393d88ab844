"""Conversions to and from other implementations' checkpoint layouts."""
