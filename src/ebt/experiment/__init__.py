"""Experiments as commands: scaling studies (scaling.py), thinking against distribution shift
(shift.py); `ebt report` for single runs lives in ebt/report.py."""
