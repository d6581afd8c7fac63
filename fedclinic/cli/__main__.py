"""python -m fedclinic.cli ..."""

from fedclinic.cli import entry

entry()
